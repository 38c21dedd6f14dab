"""Train an MLA transformer: `python examples/train_mla.py [--config FILE] [section.key=value ...]`.

Under torchrun (`torchrun --standalone --nproc-per-node N examples/train_mla.py ...`) every process runs
this script and the layout comes from `distributed.{dp,tp,pp}` and the world size. With no arguments it
trains a tiny model on the built-in corpus (the Python standard library's sources) on whatever is there.
"""

from __future__ import annotations

import argparse
import sys

import yaml
from torch.distributed.elastic.multiprocessing.errors import record

from models.config import MLAConfig
from train.config import ConfigError, config_to_dict, load_config
from train.context import fail
from train.faults import FaultPlan, NonFiniteError
from train.rundir import RunDirError
from train.trainer import train_once


@record  # under torchrun, an uncaught exception's traceback reaches torchrun's failure summary
def main(argv: list[str] | None = None, faults: FaultPlan | None = None) -> dict | None:
    """Parse the command line and train; `faults` is the test seam (tests/fault_entry.py), None here."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", help="YAML file with sections model, data, distributed, optim, train, lora"
    )
    parser.add_argument("--print-config", action="store_true", help="print the configuration and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=10")
    args = parser.parse_intermixed_args(argv)  # overrides before and after --config
    try:
        config = load_config(args.config, args.overrides)
        if args.print_config:
            resolved = config_to_dict(config)
            defaults = {k: v for k, v in MLAConfig().to_dict().items() if k != "vocab_size"}
            resolved["model"] = {**defaults, **resolved["model"]}
            print("# model.vocab_size, unless set, is the trained tokenizer's vocabulary size")
            print(yaml.safe_dump(resolved, sort_keys=False), end="")
            return None
        return train_once(config, faults=faults)
    except (ConfigError, RunDirError, ValueError, NonFiniteError) as error:  # alike on every rank
        fail(str(error).splitlines()[0] if str(error) else repr(error), every_rank=False)
    except OSError as error:  # maybe this rank's alone (a file, a folder, a disk of this node)
        fail(str(error).splitlines()[0] if str(error) else repr(error))
    except KeyboardInterrupt as error:
        fail(str(error) or "interrupted", code=130)


if __name__ == "__main__":
    main(sys.argv[1:])
