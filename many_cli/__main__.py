from many_cli.entry import main

main()
