"""The contract between a checkpoint and the config that resumes it: one rulebook, used by every stage.

A checkpoint records what it was trained with, its *run record* (key ``lit_ft_run``): the stage and module class,
the base model and tokenizer, the trainable adapters with their LoRA settings, the data source (the data module's
settings and a digest of each local file it reads), the run length and the scheduler horizon, and the module's
other settings. On resume (``--ckpt_path last`` or a file, in ``fit``, ``validate`` or ``test``) the record is
compared with the config's, field by field, by :data:`RULES`:

- ``refuse``: the run stops before any training step with one line naming the field, the checkpoint's value and
  the config's value (:class:`lit_ft.errors.CheckpointError`);
- ``log``: the config's value is used, and one line says so;
- ``ignore``: no effect on training (``data.num_workers``).

The config always wins: LightningCLI's habit of replacing the model's settings with the checkpoint's
hyper-parameters is switched off (:mod:`lit_ft.cli`). Tensors are never loaded partially: the checkpoint must hold
exactly the trainable tensors (and kept buffers) of the built model, with the same shapes, or the run is refused.

It is checked twice, with the same rules: by the CLI before anything is built (:func:`check_before_build`: the
file, the stage, the base model, the data, the run length), and by the module when Lightning hands it the
checkpoint, with the model built (:meth:`CheckpointContract.on_load_checkpoint`: adapters, LoRA shapes, tensors).

A stage joins by inheriting :class:`CheckpointContract` before ``L.LightningModule`` and naming its ``stage``::

    class DPO(CheckpointContract, BackboneModule, L.LightningModule):
        stage = "dpo"
        checkpoint_buffers = ()  # buffers to keep in checkpoints beside the trainable parameters
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import math
import os
import weakref
import zipfile
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from lit_ft.backbone import EMBEDDED_TOKENIZER, keep_trainable_in_checkpoint, looks_local
from lit_ft.callbacks.preflight import check_export_dir, check_free_space, check_writable, export_bytes
from lit_ft.errors import CheckpointError

RECORD_KEY = "lit_ft_run"
RECORD_VERSION = 1
TRAINING_STATE_KEYS = ("optimizer_states", "lr_schedulers", "loops")  # what `fit` needs beyond the weights


class Rule(NamedTuple):
    """What happens when a record field (matched by ``pattern``, fnmatch-style) differs on resume."""

    pattern: str
    action: Literal["refuse", "log", "ignore"]
    why: str


# First match wins; the resume table in docs/reference.md lists the same rules.
RULES: tuple[Rule, ...] = (
    Rule("stage", "refuse", "a checkpoint resumes only the stage that wrote it"),
    Rule("model_class", "refuse", "a checkpoint resumes only the module class that wrote it"),
    Rule("base_model", "refuse", "the trained weights belong to that base model"),
    Rule("tokenizer", "refuse", "token ids would mean other tokens"),
    Rule("adapters", "refuse", "the checkpoint's weights are stored under its adapter names, so none would load"),
    Rule("lora.*.dropout", "log", "a training-time setting: the config's is used"),
    Rule("lora.loraplus_lr_ratio", "refuse", "the checkpoint's optimiser state holds its own parameter groups "
                                             "(LoRA+ gives the B matrices a group of their own)"),
    Rule("lora.*", "refuse", "the adapter would have other shapes, layers or scale than its trained weights"),
    Rule("data.num_workers", "ignore", ""),
    Rule("data.micro_batch_size", "log", "the data position is counted in examples: none is skipped or repeated"),
    Rule("data.*", "refuse", "the saved data position would point at other examples; to train on other data, "
                             "start a new run from the exported adapter (model.backbone.init_adapter)"),
    Rule("max_steps", "log", "the learning-rate horizon follows the new run length"),
    Rule("max_epochs", "log", "the learning-rate horizon follows the new run length"),
    Rule("world_size", "log", "the data position is counted in examples: none is skipped or repeated"),
    Rule("accumulate_grad_batches", "log", "the effective batch changes from here on"),
    Rule("settings.*", "log", "the config's value is used"),
)


def rule_for(field: str) -> Rule:
    for rule in RULES:
        if fnmatch.fnmatchcase(field, rule.pattern):
            return rule
    return Rule(field, "log", "the config's value is used")


# ----------------------------------------------------------------------------------------------- the record
def _plain(value: Any) -> Any:
    """A JSON-like copy (checkpoints load with ``weights_only=True``): dataclasses, tuples, sets, other objects."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return repr(value)


def source_identity(name: str | None) -> str | None:
    """A model or tokenizer source as compared on resume: the resolved folder for a local path, else the hub id."""
    if name is None:
        return None
    if looks_local(name):
        return str(Path(os.path.expanduser(name)).resolve())
    return name


def _backbone_fields(spec: Any) -> dict[str, Any]:
    if spec.pretrained is None:
        base = "tiny " + json.dumps(_plain(spec.tiny), sort_keys=True)
    else:
        base = source_identity(spec.pretrained)
    tokenizer = source_identity(spec.tokenizer) if spec.tokenizer else (base if spec.pretrained else EMBEDDED_TOKENIZER)
    fields = {"base_model": base, "tokenizer": tokenizer}
    if getattr(spec, "lora", None) is not None:  # LoRA+: known before the model is built
        fields["lora.loraplus_lr_ratio"] = spec.lora.loraplus_lr_ratio
    return fields


_DATA_FIELDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # data module -> its fields


def _digest(path: Path) -> str:
    """sha256 of a file, or of a folder's listing (names and sizes: a datasets folder can be large)."""
    h = hashlib.sha256()
    if path.is_dir():
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{item.relative_to(path)}\0{item.stat().st_size}\n".encode())
        return "listing:" + h.hexdigest()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_fields(datamodule: Any) -> dict[str, Any]:
    """The data source: the data module's class and settings, and a digest of each local file they name.

    Computed once per data module (files are hashed at the first checkpoint, not at every one).
    """
    if datamodule is None:
        return {}
    cached = _DATA_FIELDS.get(datamodule)
    if cached is not None:
        return dict(cached)
    cls = type(datamodule)
    fields: dict[str, Any] = {"data.class_path": f"{cls.__module__}.{cls.__qualname__}"}
    hparams = dict(getattr(datamodule, "hparams", {}) or {})
    for key, value in sorted(hparams.items()):
        if key.startswith("_"):
            continue
        fields[f"data.{key}"] = _plain(value)
        if isinstance(value, str) and value and "://" not in value:
            path = Path(os.path.expanduser(value))
            if path.exists():  # a local file or folder: where it is, and what it holds
                fields[f"data.{key}"] = str(path.resolve())
                fields[f"data.{key}.sha256"] = _digest(path)
    try:
        _DATA_FIELDS[datamodule] = fields
    except TypeError:  # not weak-referenceable: computed again next time
        pass
    return dict(fields)


def _settings(module: Any) -> dict[str, Any]:
    """The module's other settings (not the structural backbone fields, which have rules of their own). A group
    of settings (a dataclass such as PPO's ``sampling``) gives one field per setting: ``settings.sampling.top_p``."""
    hparams = _plain(dict(getattr(module, "hparams", {}) or {}))
    fields = {}
    for key, value in hparams.items():
        if key.startswith("_"):
            continue
        if key == "backbone" and isinstance(value, dict):
            for name, inner in value.items():
                if name not in ("pretrained", "tokenizer", "tiny", "lora"):
                    fields[f"settings.backbone.{name}"] = inner
            continue
        fields.update(_flat(value, f"settings.{key}") if value else {f"settings.{key}": value})
    return fields


def _flat(tree: Any, prefix: str) -> dict[str, Any]:
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            if not str(key).startswith("_"):
                flat.update(_flat(value, f"{prefix}.{key}"))
        return flat
    return {prefix: tree}


def run_paths(module: Any, trainer: Any = None, datamodule: Any = None) -> dict[str, str]:
    """The existing local paths a run reads or writes, by setting: every model and data setting naming one (the
    base model, adapters it starts from, the data), and the checkpoint and log folders. An export must not
    replace any of them (:func:`lit_ft.callbacks.preflight.check_export_dir`)."""
    settings = _flat(_plain(dict(getattr(module, "hparams", {}) or {})), "model")
    settings.update(_flat(_plain(dict(getattr(datamodule, "hparams", {}) or {})), "data"))
    paths = {name: value for name, value in settings.items() if name != "model.export_dir"
             and isinstance(value, str) and value and "://" not in value and os.path.exists(os.path.expanduser(value))}
    outputs = [(f"{type(c).__name__}.dirpath", getattr(c, "dirpath", None))
               for c in getattr(trainer, "checkpoint_callbacks", None) or []]
    outputs += [(f"{type(lg).__name__}.save_dir", getattr(lg, "save_dir", None))
                for lg in getattr(trainer, "loggers", None) or []]
    for name, path in outputs:
        if path:
            paths[name if name not in paths else f"{name} ({path})"] = str(path)
    return paths


def check_export_target(module: Any, trainer: Any = None, datamodule: Any = None) -> None:
    """The module's ``export_dir`` (if any) may be replaced: it is none of the run's other paths."""
    check_export_dir(getattr(module, "export_dir", None), run_paths(module, trainer, datamodule))


def trainable_adapters(model: Any) -> dict[str, Any]:
    """The PEFT adapters of ``model`` that train, with their LoRA settings (empty for a plain model)."""
    configs = getattr(model, "peft_config", None) or {}
    names = {n for n, p in model.named_parameters() if p.requires_grad} if configs else set()
    adapters = {}
    for name, config in configs.items():
        if any(f".{name}." in n for n in names):
            targets = config.target_modules
            adapters[name] = {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                              "target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets,
                              "use_dora": bool(getattr(config, "use_dora", False)),
                              "use_rslora": bool(getattr(config, "use_rslora", False))}
    return adapters


def expected_tensors(module: Any) -> dict[str, list[int]]:
    """The tensors a checkpoint of ``module`` holds: its trainable parameters and its kept buffers."""
    tensors = {n: list(p.shape) for n, p in module.named_parameters() if p.requires_grad}
    buffers = dict(module.named_buffers())
    tensors.update({n: list(buffers[n].shape) for n in getattr(module, "checkpoint_buffers", ()) if n in buffers})
    return tensors


def run_record(module: Any, trainer: Any = None, datamodule: Any = None, built: bool = True) -> dict[str, Any]:
    """What ``module`` (with ``trainer`` and ``datamodule``) trains with; ``built=False`` leaves out what only the
    built model knows (adapters, tensors, the scheduler horizon)."""
    cls = type(module)
    record: dict[str, Any] = {"version": RECORD_VERSION, "stage": module.stage,
                              "model_class": f"{cls.__module__}.{cls.__qualname__}"}
    spec = getattr(module, "backbone", None)
    if spec is not None:
        record.update(_backbone_fields(spec))
    if built and getattr(module, "model", None) is not None:
        adapters = trainable_adapters(module.model)
        record["adapters"] = sorted(adapters)
        for name, settings in adapters.items():
            record.update({f"lora.{name}.{key}": value for key, value in settings.items()})
        record["tensors"] = expected_tensors(module)
    record.update(data_fields(datamodule))
    if trainer is not None:
        record.update({"max_steps": trainer.max_steps, "max_epochs": trainer.max_epochs,
                       "world_size": trainer.world_size, "accumulate_grad_batches": trainer.accumulate_grad_batches})
        configs = getattr(trainer, "lr_scheduler_configs", None) or []
        if built and configs:
            record["horizon"] = getattr(configs[0].scheduler, "total_steps", None)
    record.update(_settings(module))
    return record


# ------------------------------------------------------------------------------------------- comparison
def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _field_order(field: str) -> tuple[int, str]:
    return next((i for i, rule in enumerate(RULES) if fnmatch.fnmatchcase(field, rule.pattern)), len(RULES)), field


def compare_records(saved: dict[str, Any], current: dict[str, Any], path: str, fitting: bool = True) -> list[str]:
    """Apply :data:`RULES` to every field both records hold (the data fields too when one side lacks them);
    raise :class:`CheckpointError` at the first refused difference, else return the lines to log."""
    fields = set(saved) & set(current)
    if "data.class_path" in saved and "data.class_path" in current:
        fields |= {f for f in set(saved) | set(current) if f.startswith("data.")}
    fields -= {"version", "tensors", "horizon"}
    if not fitting:  # validate/test read the weights only: the data and the run length do not matter
        fields = {f for f in fields if f in ("stage", "model_class", "base_model", "tokenizer", "adapters")
                  or f.startswith("lora.")}
    lines = []
    for field in sorted(fields, key=_field_order):
        old, new = saved.get(field, "(absent)"), current.get(field, "(absent)")
        if old == new:
            continue
        rule = rule_for(field)
        if rule.action == "refuse":
            raise CheckpointError(f"{path}: cannot resume: {field} is {_show(old)} in the checkpoint, {_show(new)} "
                                  f"in the config; {rule.why}")
        if rule.action == "log":
            lines.append(f"lit_ft: resume: {field}: checkpoint {_show(old)}, config {_show(new)} ({rule.why})")
    return lines


def check_run_length(checkpoint: dict[str, Any], max_steps: int | None, path: str) -> None:
    """A resumed run cannot end before the step its checkpoint is at."""
    step = int(checkpoint.get("global_step", 0))
    if max_steps is not None and max_steps != -1 and max_steps < step:
        raise CheckpointError(f"{path}: cannot resume: trainer.max_steps={max_steps} is below the checkpoint's step "
                              f"{step}; set max_steps >= {step} to continue it")


def check_tensors(checkpoint: dict[str, Any], expected: dict[str, list[int]], path: str) -> None:
    """The checkpoint must hold exactly ``expected`` (names and shapes): nothing is ever loaded partially."""
    state = checkpoint.get("state_dict") or {}
    held = {k: list(getattr(v, "shape", [])) for k, v in state.items()}
    missing = sorted(set(expected) - set(held))
    extra = sorted(set(held) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the model's {len(expected)} trainable tensors are not in it "
                         f"(e.g. {missing[0]})")
        if extra:
            parts.append(f"it holds {len(extra)} the model does not have (e.g. {extra[0]})")
        raise CheckpointError(f"{path}: cannot resume: {'; '.join(parts)}; nothing was loaded")
    for name in sorted(expected):
        if held[name] != expected[name]:
            raise CheckpointError(f"{path}: cannot resume: tensor {name} has shape {held[name]} in the checkpoint, "
                                  f"{expected[name]} in the model (config); nothing was loaded")
        tensor = state[name]
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: cannot resume: tensor {name} holds nan or inf values; the checkpoint "
                                  "is damaged, resume from an earlier one")


# ------------------------------------------------------------------------------------------ the checkpoint file
def read_checkpoint(path: str | os.PathLike, fitting: bool = True, weights_only: bool | None = True) -> dict:
    """Load a checkpoint file, or fail in one line: missing, a folder, empty, truncated or corrupt, not a
    Lightning checkpoint, or (for ``fit``) holding weights only."""
    file = Path(os.path.expanduser(str(path)))
    if not file.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if file.is_dir():
        hint = (" (an exported adapter: start a new run from it with model.backbone.init_adapter)"
                if (file / "adapter_config.json").exists() else " (pass the .ckpt file, e.g. last.ckpt)")
        raise CheckpointError(f"{path}: a folder, not a checkpoint file{hint}")
    if file.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint (an interrupted copy?)")
    if not zipfile.is_zipfile(file):  # torch.save writes a zip archive; a cut one loses its central directory
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt (not a whole torch.save archive)")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=weights_only is not False)
    except Exception as err:  # zip reader, unpickler and EOF errors all mean the same to the user
        if "Unsupported global" in str(err):
            raise CheckpointError(f"{path}: holds Python objects that do not load safely (weights_only); if you "
                                  "trust the file, pass --weights_only false") from err
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0][:160]
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt ({reason})") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a Lightning training checkpoint (no state_dict)")
    if fitting:
        missing = [key for key in TRAINING_STATE_KEYS if key not in checkpoint]
        if missing:
            raise CheckpointError(f"{path}: holds weights only (no {', '.join(missing)}): it cannot resume "
                                  "training; start a new run from an exported adapter instead")
    return checkpoint


def check_before_build(module: Any, trainer: Any, datamodule: Any, path: str, fitting: bool = True,
                       weights_only: bool | None = True) -> None:
    """The CLI's check, before the model is built: the file, and every field the config alone determines."""
    checkpoint = read_checkpoint(path, fitting, weights_only)
    saved = checkpoint.get(RECORD_KEY)
    if not isinstance(module, CheckpointContract) or not isinstance(saved, dict):
        return  # a module outside the contract, or a checkpoint from before it: the tensor check still runs
    compare_records(saved, run_record(module, trainer, datamodule, built=False), path, fitting)
    if fitting:
        check_run_length(checkpoint, trainer.max_steps, path)


# --------------------------------------------------------------------------------------------- for the stages
class CheckpointContract:
    """Checkpoint hooks every stage shares: adapter-sized checkpoints that carry their run record, and a resume
    checked against the config (refused in one line, or logged in one line per allowed difference).

    ``strict_loading`` is off because checkpoints never hold the frozen base; :meth:`on_load_checkpoint` checks
    the tensors itself, exactly. Subclasses that add checkpoint hooks call ``super()`` first.
    """

    stage: str = "module"
    checkpoint_buffers: tuple[str, ...] = ()  # buffers kept beside the trainable parameters (e.g. reward stats)

    @property
    def strict_loading(self) -> bool:
        return False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable parameters (a 7B QLoRA checkpoint stays adapter-sized) and record the run."""
        keep_trainable_in_checkpoint(self, checkpoint, extra=self.checkpoint_buffers)
        trainer = self._trainer
        checkpoint[RECORD_KEY] = run_record(self, trainer, getattr(trainer, "datamodule", None))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint the config does not continue, before its weights load; log allowed changes."""
        trainer = self._trainer
        if trainer is None:  # not a resume (e.g. `load_from_checkpoint`): no config to compare with
            return
        path = str(getattr(trainer, "ckpt_path", None) or "checkpoint")
        fitting = trainer.state.fn == TrainerFn.FITTING
        saved = checkpoint.get(RECORD_KEY)
        lines = []
        if isinstance(saved, dict):
            lines = compare_records(saved, run_record(self, trainer, trainer.datamodule), path, fitting)
            self._resumed_horizon = (saved.get("horizon"), int(checkpoint.get("global_step", 0)))
        else:
            note = "has no run record (written before lit_ft kept one): only its tensors are checked"
            lines = [f"lit_ft: resume: {path} {note}"]
        if fitting:
            check_run_length(checkpoint, trainer.max_steps, path)
            self._restored_step = int(checkpoint.get("global_step", 0))
        check_tensors(checkpoint, expected_tensors(self), path)
        for line in lines:
            rank_zero_only(print)(line)
        if fitting:
            self._log_horizon()

    def on_fit_start(self) -> None:
        """Before the first step: the export folder accepts files and has room; a resumed horizon is logged."""
        export_dir = getattr(self, "export_dir", None)
        if export_dir and self.trainer.is_global_zero:
            parent = Path(os.path.expanduser(str(export_dir))).parent  # exports are written beside, then renamed
            check_export_target(self, self.trainer, getattr(self.trainer, "datamodule", None))
            check_writable(parent, "model.export_dir")
            check_free_space(parent, export_bytes(self), "model.export_dir")
        self._log_horizon()

    def on_fit_end(self) -> None:
        """A resume from a checkpoint already at ``trainer.max_steps``: Lightning skips the training loop, and with
        it every end-of-training hook, so a run killed after its last checkpoint and before its export would never
        export. Run the hooks of a zero-step training instead (the held-out evaluation, the export), then write
        the run's report again with their results."""
        trainer = self.trainer
        restored, self._restored_step = getattr(self, "_restored_step", None), None
        max_steps = trainer.max_steps
        if restored is None or max_steps is None or max_steps < 0 or restored < max_steps:
            return  # the loop ran (a checkpoint past max_steps is refused before it loads)
        rank_zero_only(print)(f"lit_ft: resume: the checkpoint is already at trainer.max_steps={max_steps}: "
                              "nothing to train; finishing the run (end-of-training evaluation and export)")
        for hook in ("on_train_start", "on_train_end"):
            for callback in trainer.callbacks:
                getattr(callback, hook)(trainer, self)
            getattr(self, hook)()
        from lit_ft.callbacks.report import RunReport

        for callback in trainer.callbacks:  # its on_fit_end ran before this hook, without those results
            if isinstance(callback, RunReport):
                callback.on_fit_end(trainer, self)

    def _log_horizon(self) -> None:
        """Once the scheduler exists and a checkpoint named its horizon: say when the new run length changed it."""
        saved, step = getattr(self, "_resumed_horizon", None) or (None, 0)
        configs = getattr(self._trainer, "lr_scheduler_configs", None) or []
        if saved is None or not configs:
            return
        self._resumed_horizon = None
        scheduler = configs[0].scheduler
        now = getattr(scheduler, "total_steps", None)
        if now is None:
            rank_zero_only(print)(f"lit_ft: resume: {type(scheduler).__name__} resumes as saved (it has no "
                                  "horizon to follow the run length)")
        elif now != saved:
            rank_zero_only(print)(f"lit_ft: resume: schedule horizon: checkpoint {saved} steps, config {now} "
                                  f"steps: the learning rate at each step from {step} on "
                                  "follows the new schedule")
