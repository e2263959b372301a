"""ckpteval entry point: compose the Hydra config and hand it to the mode it names.

    python run.py                                   # demo: train a tiny Llama, evaluate every eval.interval
    python run.py mode=loss ckpt=PATH data=local data.dataset_path=DIR
    torchrun --nproc_per_node=2 run.py mode=loss parallel=fsdp ckpt=PATH ...
    python run.py -m mode=loss ckpt='glob:outputs/**/step_*' data=local data.dataset_path=DIR
"""

import hydra
from omegaconf import DictConfig

from ckpteval.app import main as app_main
from ckpteval.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    return app_main(cfg)


if __name__ == "__main__":
    main()
