from many_cli.cli import main

main()
