"""Stage 1: read the raw data set, carve a seeded val split, write uint8 tensors + meta."""

from __future__ import annotations

import os

from kdcompress.data.prepared import Prepared, Split, channel_stats, save_prepared, split_train_val
from kdcompress.data.sources import load_source
from pipeline._common import setup, stage


@stage
def main(argv=None):
    args, params = setup(argv, "prepare", out="artifacts/data")
    cfg = params["data"]
    raw = load_source(cfg)
    train, val = split_train_val(raw.train_images, raw.train_labels, cfg.val_fraction, params["base"].seed)
    mean, std = channel_stats(train.images)
    data = Prepared(train, val, Split(raw.test_images, raw.test_labels), raw.classes, mean, std, raw.source)
    save_prepared(data, args.out)
    if not os.path.abspath(raw.source).startswith(os.path.abspath("data") + os.sep):
        print(f"note: read {raw.source}, which is outside data/: `dvc repro` will not notice when it changes")
    print(f"prepared {cfg.dataset} from {raw.source}: train {len(train)}, val {len(val)}, test {len(data.test)}, "
          f"shape {data.input_shape}")


if __name__ == "__main__":
    raise SystemExit(main())
