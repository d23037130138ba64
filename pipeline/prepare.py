"""Stage 1: read the raw data set, choose the storage (decoded tensors in memory, or an index of image
files decoded on the fly), take or carve the val split, write the prepared splits + meta."""

from __future__ import annotations

from kdcompress.data.prepare import prepare
from kdcompress.io import write_json
from pipeline._common import setup, stage


@stage
def main(argv=None):
    args, params = setup(argv, "prepare", out="artifacts/data", metrics="artifacts/metrics/prepare.json")
    cfg = params["data"]
    summary = prepare(cfg, params["base"].seed, args.out)
    write_json(args.metrics, summary)
    print(f"prepared {cfg.dataset} ({summary['storage']}): train {summary['train']}, val {summary['val']}, "
          f"test {summary['test']}")


if __name__ == "__main__":
    raise SystemExit(main())
