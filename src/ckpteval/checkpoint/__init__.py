"""Checkpoints: detect the format and completeness (cheap), load model weights, save atomically."""

from ckpteval.checkpoint.detect import (
    check_complete,
    checkpoint_identity,
    inspect_checkpoint,
    inspect_configured,
    parse_step,
)
from ckpteval.checkpoint.formats._common import config_from_model_cfg
from ckpteval.checkpoint.formats._dcp import read_dcp_metadata
from ckpteval.checkpoint.formats.hf import hf_weight_files
from ckpteval.checkpoint.info import CheckpointInfo
from ckpteval.checkpoint.load import (
                                        build_config,
                                        build_model,
                                        load_model,
                                        load_tokenizer,
                                        load_weights,
)
from ckpteval.checkpoint.save import partial_dir, save_dcp_atomic, save_hf_atomic

__all__ = ["CheckpointInfo", "build_config", "build_model", "check_complete", "checkpoint_identity",
           "config_from_model_cfg", "hf_weight_files", "inspect_checkpoint", "inspect_configured", "load_model",
           "load_tokenizer",
           "load_weights", "parse_step", "partial_dir", "read_dcp_metadata", "save_dcp_atomic", "save_hf_atomic"]
