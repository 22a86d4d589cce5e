"""How an adapter's base model was loaded for training, saved next to the adapter as ``lit_ft_base.json``.

Every adapter lit_ft writes (SFT, the reward model, PPO's policy and value, ``lit-ft export``) carries this small
JSON file, so that ``lit-ft generate``, ``score`` and ``export`` load the base exactly as the adapter was trained:
a QLoRA adapter's base in 4-bit NF4 with bfloat16 compute (about 4 GB for Mistral-7B), not unquantised in float32
(29 GB). PEFT ignores the file; ``adapter_config.json`` stays PEFT's own. The fields:

=====================  ===========================================================================================
``pretrained``         hub id or local directory of the base (None: a tiny model built from scratch)
``tokenizer``          the tokenizer setting (None: the base's own; the adapter folder holds a copy anyway)
``quantization``       "nf4" (4-bit NormalFloat, QLoRA) or "none"
``dtype``              dtype of the weights that are not quantised (embeddings, norms, head; all of them for "none")
``compute_dtype``      dtype of the 4-bit matmuls
``double_quant``       whether the quantisation constants were quantised too (QLoRA's double quantisation)
``quant_storage``      dtype the packed 4-bit weights were stored in (uint8; the compute dtype under FSDP)
``attn_implementation`` the attention backend
``prompt_format``      how prompts were rendered: "alpaca", "chat" (``[INST]`` turns or a Jinja template) or "raw"
``chat_template``      the chat template setting of the data ("builtin", a Jinja string, or None: the tokenizer's)
``stage``              the LightningModule that trained it (CausalLM, RewardModel, PPO) or "lit-ft export"
=====================  ===========================================================================================
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lit_ft.backbone.builder import Backbone
from lit_ft.errors import BackboneError

BASE_FILE = "lit_ft_base.json"
PromptFormat = Literal["alpaca", "chat", "raw"]
# data formats (SFT, preference and prompt records) -> how their prompts are rendered
PROMPT_FORMAT_OF_DATA: dict[str, PromptFormat] = {
    "alpaca": "alpaca", "chat": "chat", "hh": "chat", "prompt": "chat", "prompt_completion": "raw",
}


@dataclass
class BaseRecord:
    """How the base model of an adapter was loaded in training, and how its prompts were rendered."""

    pretrained: str | None
    tokenizer: str | None = None
    quantization: Literal["none", "nf4"] = "none"
    dtype: str = "float32"
    compute_dtype: str = "float32"
    double_quant: bool = True
    quant_storage: str = "uint8"
    attn_implementation: str = "sdpa"
    prompt_format: PromptFormat | None = None
    chat_template: str | None = None
    stage: str | None = None

    @classmethod
    def of(cls, spec: Backbone, prompt_format: PromptFormat | None = None, chat_template: str | None = None,
           stage: str | None = None) -> BaseRecord:
        """The record of a backbone as it was loaded (see :meth:`BackboneModule.load_spec`)."""
        storage = "uint8" if spec.quant_storage == "auto" else spec.quant_storage
        return cls(spec.pretrained, spec.tokenizer, spec.quantization, spec.dtype, spec.compute_dtype,
                   spec.double_quant, storage, spec.attn_implementation, prompt_format, chat_template, stage)

    def backbone(self) -> Backbone:
        """A backbone that loads the base the same way (no LoRA: the adapter is loaded onto it)."""
        return Backbone(pretrained=self.pretrained, tokenizer=self.tokenizer, quantization=self.quantization,
                        dtype=self.dtype, compute_dtype=self.compute_dtype, double_quant=self.double_quant,
                        attn_implementation=self.attn_implementation, lora=None)

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / BASE_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | Path) -> BaseRecord | None:
        """The record in ``directory``, None when it has none (an adapter made elsewhere); unknown keys are
        ignored, so that newer records still load."""
        path = Path(directory) / BASE_FILE
        if not path.is_file():
            return None
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise BackboneError(f"{path}: unreadable ({err})") from None
        if not isinstance(values, dict):
            raise BackboneError(f"{path}: expected a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def prompt_format_of(data_format: str | None, source: Any = "unknown") -> PromptFormat | None:
    """How a data module with record format ``data_format`` rendered its prompts. A source that is not a file or
    hub id (the embedded world, as an object or as its ``{class_path, init_args}`` config; None before it was
    required) gives instruction records in the Alpaca template. None when it cannot be told (``auto`` on a file)."""
    if data_format in (None, "auto"):
        return None if isinstance(source, str) else "alpaca"
    return PROMPT_FORMAT_OF_DATA.get(data_format)


def data_prompt_format(datamodule: Any) -> tuple[PromptFormat | None, str | None]:
    """(prompt format, chat template setting) of a live data module, from what it resolved while loading."""
    if datamodule is None:
        return None, None
    fmt = getattr(datamodule, "prompt_format", None)  # the preference data module names it itself
    if fmt is None:
        resolved = getattr(datamodule, "train_format", None)
        if resolved in (None, "auto"):
            resolved = getattr(datamodule, "format", None)
        fmt = prompt_format_of(resolved, getattr(datamodule, "source", "unknown"))
    return fmt, getattr(datamodule, "chat_template", None)
