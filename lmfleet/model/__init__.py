"""The model: config, transformer, checkpoint format and tokenizer."""

from lmfleet.model.checkpoint import load_model, model_info, read_config, save_model
from lmfleet.model.config import FLAVORS, ModelConfig
from lmfleet.model.generate import generate
from lmfleet.model.tokenizer import Tokenizer, load_tokenizer, train_bpe
from lmfleet.model.transformer import Transformer, build_model

__all__ = ["FLAVORS", "ModelConfig", "Tokenizer", "Transformer", "build_model", "generate", "load_model",
           "load_tokenizer", "model_info", "read_config", "save_model", "train_bpe"]
