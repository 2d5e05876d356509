"""The token ids `many stats` feeds the model for each record of DATA, with ADAPTER's records asked
as `many` resolves it (--template TEMPLATE when given, else ms-swift's args.json beside the
adapter, else the base's own template): its own reading, asking and encoding, one record a batch.

    python many_ids.py BASE ADAPTER DATA OUT.json [TEMPLATE]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from many_cli.data import encode_loaded, load_inputs
from many_cli.formats import read_records
from many_cli.models import load_processor
from many_cli.options import StatsOptions
from many_cli.prompting import prompting_for


def main(base: str, adapter: Path, data: Path, out: Path, template: str | None = None) -> None:
    options = StatsOptions(template=template)
    prompting, _ = prompting_for(adapter, options.asking)
    processor = prompting.wrap(load_processor(base, options.padding_side))
    ids = []
    for record in read_records(data, options.reading):
        encoded = encode_loaded(processor, [record], [load_inputs(processor, record)])
        ids.append(encoded["input_ids"][0].tolist())
    out.write_text(json.dumps(ids))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), *sys.argv[5:])
