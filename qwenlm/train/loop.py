"""The training loop: one recipe in, a trained adapter or model folder out, no work lost.

Each optimizer step takes the next ``global batch`` of rows (micro_batch_size x grad_accum x
processes) from a seeded endless sequence of epoch permutations, so the data position is the
step number. The loss of each micro-batch is a sum divided by the number of target units
(tokens, or pairs for DPO) in the whole global batch, which makes accumulation and data
parallelism compute the gradient of one large batch. Every ``checkpoint.every`` steps, at the
end, and on SIGINT/SIGTERM, the run is saved atomically (see ``checkpoint``); ``resume=True``
continues from the newest checkpoint that verifies, with model, optimizer, schedule, RNG and
data position restored, so the losses that follow are the ones the uninterrupted run logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwenlm import registry
from qwenlm.chat.template import ChatTemplate
from qwenlm.config import ModelConfig
from qwenlm.errors import QwenlmError
from qwenlm.fsutil import atomic_write, write_json
from qwenlm.lora import adapter_config, apply_lora, read_adapter_config, save_adapter
from qwenlm.tokenizer import Tokenizer
from qwenlm.train import distributed
from qwenlm.train.checkpoint import (
    Checkpoints,
    flatten_optimizer_state,
    read_json,
    read_tensors,
    unflatten_optimizer_state,
)
from qwenlm.train.data import data_digest, global_batch_indices, load_records, steps_for_epochs
from qwenlm.train.losses import TargetLogprobs
from qwenlm.train.recipe import Recipe, dump_yaml
from qwenlm.weights.safetensors import write_tensors

LOG = "log.jsonl"


class TrainError(QwenlmError):
    """A training run that cannot start or continue."""


@dataclass
class TrainResult:
    out: Path
    step: int  # optimizer steps done
    total_steps: int
    loss: float | None = None  # the last logged training loss
    eval: dict[str, float] = field(default_factory=dict)  # the last evaluation
    interrupted: bool = False
    resumed_from: int | None = None


def cosine_lr(step: int, *, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Learning rate of (0-based) ``step``: linear warmup, then cosine down to min_ratio*peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class StopSignals:
    """Turns SIGINT/SIGTERM into a request to save and stop after the current step.

    A second SIGINT interrupts at once. Handlers are installed only for the duration of the
    run and only from the main thread (Python allows no other).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def train(
    recipe: Recipe,
    *,
    resume: bool = False,
    force_resume: bool = False,
    check_data: bool = False,
    say: Callable[[str], Any] | None = None,
) -> TrainResult:
    """Run ``recipe``; under torchrun every process calls this with the same recipe.

    ``resume`` continues from the newest valid checkpoint in ``recipe.out`` (or starts afresh
    when there is none); without it an ``out`` folder that already holds a run is an error. A
    checkpoint made from other data or another recipe (steps aside) is refused, since the run
    would no longer reproduce; ``force_resume`` continues from it anyway.
    ``check_data`` reads, checks and renders the data, reports it, and stops.
    """
    d = distributed.setup(device=recipe.train.device, backend=recipe.distributed.backend)
    try:
        return _Run(recipe, d, say).run(
            resume=resume or force_resume, force=force_resume, check_data=check_data
        )
    finally:
        d.close()


def recipe_digest(recipe: Recipe) -> str:
    """sha256 of what shapes the training math: the recipe less its length, output folder,
    device and bookkeeping (logging, evaluation, checkpoint and process settings)."""
    fields = dataclasses.asdict(recipe)
    for key in ("out", "log", "eval", "checkpoint", "distributed"):
        fields.pop(key)
    for key in ("steps", "epochs", "device"):
        fields["train"].pop(key)
    for key in ("cache_dir", "train", "eval"):  # the data's bytes are hashed on their own
        fields["data"].pop(key)
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    bf16 = precision == "bf16-autocast" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


class _Run:
    def __init__(self, recipe: Recipe, d: distributed.Dist, say: Callable[[str], Any] | None):
        self.r = recipe
        self.d = d
        self.out = Path(recipe.out)
        self.ckpts = Checkpoints(self.out / "checkpoints", recipe.checkpoint.keep)
        self.log_path = self.out / LOG
        self._say_fn = say or (lambda m: print(m, file=sys.stderr, flush=True))
        self._bar: Any = None

    # -- messages ------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        if not self.d.is_main:
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(message, file=sys.stderr)
        else:
            self._say_fn(message)

    def _log(self, record: dict[str, Any]) -> None:
        if self.d.is_main:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    # -- set-up --------------------------------------------------------------------------------
    def _check_out(self, resume: bool) -> None:
        if not resume and (self.ckpts.steps() or self.log_path.exists()):
            raise TrainError(
                f"{self.out} already holds a training run",
                hint="pass --resume to continue it, or choose another out folder",
            )

    def _open_base(self) -> tuple[Any, Tokenizer, str | None, ModelConfig]:
        """(open checkpoint or None, tokenizer, chat template, config); no weights read yet."""
        from qwenlm.train import pretrain
        from qwenlm.weights import open_checkpoint

        if self.r.model is None:
            tok, template = pretrain.scratch_tokenizer(self.r.scratch)
            return None, tok, template, pretrain.scratch_config(self.r.scratch, tok)
        ckpt = open_checkpoint(registry.resolve(self.r.model))
        return ckpt, ckpt.tokenizer, ckpt.chat_template, ckpt.config

    def _build_task(self, tok: Tokenizer, template_src: str | None) -> Any:
        r = self.r
        pad = tok.pad_token_id
        if pad is None:
            pad = tok.eos_token_id if tok.eos_token_id is not None else 0
        if r.task == "pretrain":
            from qwenlm.train.pretrain import build_pretrain

            cache = Path(r.data.cache_dir) if r.data.cache_dir else registry.cache_dir() / "tokens"
            return build_pretrain(r, tok, self.say, cache)
        template = ChatTemplate(template_src, tok)
        if r.task == "sft":
            from qwenlm.train.sft import build_sft

            return build_sft(r, *self._records, template, pad, self.say)
        from qwenlm.train.dpo import build_dpo

        return build_dpo(r, *self._records, template, pad, self.say)

    def _read_records(self) -> None:
        # Chat and preference records are checked before any weights are read: a typo in the
        # data should cost seconds, not a model load.
        r = self.r
        self._records: tuple[list[Any], list[Any]] = ([], [])
        if r.task == "pretrain":
            return
        kind = "preference" if r.task == "dpo" else "chat"
        fmt = "auto" if r.data.format in ("auto", "preference") else r.data.format
        self._rejected: dict[str, list[str]] = {"train": [], "eval": []}
        limit = r.data.max_rejected
        train = load_records(
            r.data.train, kind, fmt, max_rejected=limit, rejected=self._rejected["train"]
        )
        evals = (
            load_records(
                r.data.eval, kind, fmt, max_rejected=limit, rejected=self._rejected["eval"]
            )
            if r.data.eval
            else []
        )
        self._records = (train, evals)
        for split, bad in self._rejected.items():
            if bad:
                self.say(
                    f"skipped {len(bad)} bad {split} record(s) (data.max_rejected "
                    f"{limit:g}; all listed in data-manifest.json):\n  " + "\n  ".join(bad[:10])
                )

    def _data_manifest(self, task: Any) -> dict[str, Any]:
        """What the data gave: records accepted and rejected (with why), and what rendering
        truncated or dropped. Written as data-manifest.json next to the run's output."""
        r = self.r
        out: dict[str, Any] = {}
        for split, files, rows in (
            ("train", r.data.train, self._records[0]),
            ("eval", r.data.eval, self._records[1]),
        ):
            bad = getattr(self, "_rejected", {}).get(split, [])
            if files:
                out[split] = {
                    "files": list(files),
                    "accepted": len(rows),
                    "rejected": len(bad),
                    "rejections": bad,
                }
        stats = getattr(task, "render_stats", None)
        if stats is not None:
            out["render"] = {
                "examples": stats.examples,
                "truncated": stats.truncated,
                "dropped_without_supervised_tokens": stats.dropped,
                "tokens": stats.tokens,
                "supervised_tokens": stats.targets,
            }
        out["train_rows"] = len(task.train_rows)
        return out

    def _build_model(self, ckpt: Any, config: ModelConfig) -> nn.Module:
        from qwenlm.models import build_model

        r = self.r
        dev = self.d.device
        dtype = torch.float32 if r.dtype == "float32" else torch.bfloat16
        if ckpt is None:
            from qwenlm.train.pretrain import build_scratch_model

            model = build_scratch_model(config, r.scratch.init_std, r.train.seed).to(dev, dtype)
        else:
            # Q-LoRA quantizes on the CPU first, so the full-precision model never has to fit
            # on the accelerator.
            where = "cpu" if r.method == "qlora" else dev
            with ckpt:
                model = build_model(config, ckpt.tensors(dtype), dtype=dtype, device=where)
        if r.method == "full":
            model.requires_grad_(True)
        else:
            if r.method == "qlora":
                from qwenlm.quant.nf4 import quantize_model_nf4

                quantize_model_nf4(
                    model, block_size=r.qlora.block_size, double_quant=r.qlora.double_quant
                )
            torch.manual_seed(r.train.seed)  # the same adapter initialisation on every process
            apply_lora(
                model,
                target_modules=r.lora.target_modules,
                r=r.lora.r,
                alpha=r.lora.alpha,
                dropout=r.lora.dropout,
                use_rslora=r.lora.use_rslora,
            )
            model.to(dev)
        if r.train.activation_checkpointing:
            from torch.distributed._composable import checkpoint

            for layer in model.model.layers:
                checkpoint(layer)
        return model.train()

    def _optimizer(self, net: nn.Module) -> torch.optim.Optimizer:
        o = self.r.optim
        decay = [p for p in net.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in net.parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": o.weight_decay}]
        if no_decay:  # biases and norms are not decayed
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)

    # -- the run -------------------------------------------------------------------------------
    def run(self, *, resume: bool, force: bool, check_data: bool) -> TrainResult:
        r, d = self.r, self.d
        self._check_out(resume)
        self._read_records()
        ckpt, tok, template_src, config = self._open_base()
        try:
            task = self._build_task(tok, template_src)
        except BaseException:
            if ckpt is not None:
                ckpt.close()
            raise
        G = r.train.micro_batch_size * r.train.grad_accum * d.world
        total = r.train.steps or steps_for_epochs(len(task.train_rows), G, r.train.epochs)
        if check_data:
            if ckpt is not None:
                ckpt.close()
            self.say(
                f"data checked: {len(task.train_rows)} training rows, "
                f"{len(task.eval_rows)} eval rows"
            )
            return TrainResult(self.out, 0, total)
        self.tok, self.template_src, self.config = tok, template_src, config

        model = self._build_model(ckpt, config)
        self.model = model
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        net = distributed.wrap(
            TargetLogprobs(model), list(model.model.layers), d, r.distributed.strategy
        )
        opt = self._optimizer(net)
        if d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            text = dump_yaml(r)
            atomic_write(self.out / "recipe.yaml", lambda p: p.write_text(text, encoding="utf-8"))
            write_json(self.out / "data-manifest.json", self._data_manifest(task))
        self.fingerprint = {
            "recipe_sha256": recipe_digest(r),
            "data_sha256": data_digest([*r.data.train, *r.data.eval]),
        }
        self.say(
            f"{r.task} / {r.method}: {n_params / 1e6:.1f}M parameters, {n_train / 1e6:.2f}M "
            f"trainable; {total} steps of {G} rows ({d.world} process{'es' if d.world > 1 else ''}"
            f"{', ' + r.distributed.strategy if d.world > 1 else ''}, {d.device})"
        )

        # Dropout differs between processes; a resumed run restores these states instead.
        torch.manual_seed(r.train.seed * 7919 + d.rank + 1)
        start, resumed_from = 0, None
        if resume:
            start = self._resume(net, opt, force)
            resumed_from = start if start else None
        elif d.is_main:
            self.ckpts.clean_partials()
        d.barrier()

        result = TrainResult(self.out, start, total, resumed_from=resumed_from)
        if start == 0 and len(task.eval_rows):
            result.eval = self._evaluate(net, task, 0)
        with StopSignals() as stop, self._progress(total, start):
            step = self._train_steps(net, opt, task, result, stop, resumed_from, G)
            if result.interrupted:
                return result
        if len(task.eval_rows):
            result.eval = self._evaluate(net, task, step)
        self._finish(net)
        if r.log.plot and d.is_main and not self._plot():
            self.say("loss.png not written: install matplotlib (pip install 'qwenlm[train]')")
        return result

    def _train_steps(
        self,
        net: nn.Module,
        opt: torch.optim.Optimizer,
        task: Any,
        result: TrainResult,
        stop: StopSignals,
        resumed_from: int | None,
        G: int,
    ) -> int:
        """Steps from ``result.step`` to the last, logging, evaluating and saving as the recipe
        says; returns the step reached (``result.interrupted`` when a signal stopped it)."""
        r, d = self.r, self.d
        start, total = result.step, result.total_steps
        step = start
        last_saved = start if resumed_from is not None else -1
        t_start = time.perf_counter()
        while step < total:
            t0 = time.perf_counter()
            record = self._step(net, opt, task, step, total, G)
            step += 1
            elapsed = time.perf_counter() - t0
            record.update(
                step=step,
                tokens_per_s=record["tokens"] / elapsed if elapsed > 0 else 0.0,
                elapsed_s=round(time.perf_counter() - t_start, 3),
            )
            result.step, result.loss = step, record["loss"]
            if step % r.log.every == 0 or step == total:
                self._log({"kind": "train", **record})
            self._bar_update(record)
            stopping = d.any(stop.signum is not None)
            if len(task.eval_rows) and r.eval.every and step % r.eval.every == 0 and step < total:
                result.eval = self._evaluate(net, task, step)
            if stopping or step == total or (r.checkpoint.every and step % r.checkpoint.every == 0):
                self._save(step, net, opt)
                last_saved = step
                if r.log.plot and d.is_main:
                    self._plot()
            if stopping:
                self.say(
                    f"stopped by signal at step {step}/{total}; checkpoint saved in "
                    f"{self.ckpts.path(step)}; continue with --resume"
                )
                result.interrupted = True
                return step
        if last_saved != step:
            self._save(step, net, opt)
        return step

    def _step(
        self, net: nn.Module, opt: torch.optim.Optimizer, task: Any, step: int, total: int, G: int
    ) -> dict[str, Any]:
        r, d = self.r, self.d
        mb, accum = r.train.micro_batch_size, r.train.grad_accum
        idx = global_batch_indices(len(task.train_rows), step, G, r.train.seed)
        rows = [task.train_rows[i] for i in idx]
        units = task.units(rows)  # the same on every process: each sees the whole batch's rows
        mine = rows[d.rank * mb * accum : (d.rank + 1) * mb * accum]
        sums: dict[str, float] = {}
        for m in range(accum):
            micro = mine[m * mb : (m + 1) * mb]
            with self._sync(net, m == accum - 1), _autocast(d.device, r.train.precision):
                loss, stats = task.forward(net, self.model, micro, d.device)
            # DDP and FSDP average gradients over processes; scale back up to a plain sum.
            # max: a batch with no target gives a zero loss, never a division by zero or NaN
            (loss * (d.world / max(units, 1))).backward()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
        params = [p for p in net.parameters() if p.requires_grad]
        grad_norm = None
        if r.optim.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, r.optim.grad_clip)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        lr = cosine_lr(
            step,
            total=total,
            peak=r.optim.lr,
            warmup=r.schedule.warmup_steps,
            min_ratio=r.schedule.min_lr_ratio,
        )
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        keys = sorted(sums)
        totals = dict(zip(keys, d.sum([sums[k] for k in keys]), strict=True))
        record = task.summarize(totals, units)
        record.update(lr=lr, tokens=int(totals["tokens"]))
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        return record

    @contextlib.contextmanager
    def _sync(self, net: nn.Module, sync: bool) -> Iterator[None]:
        """Reduce gradients across processes only on the last micro-batch of a step."""
        if sync or not self.d.active:
            if hasattr(net, "set_requires_gradient_sync"):
                net.set_requires_gradient_sync(True)
            yield
        elif hasattr(net, "no_sync"):  # DDP
            with net.no_sync():
                yield
        else:  # FSDP2
            net.set_requires_gradient_sync(False)
            yield

    @torch.no_grad()
    def _evaluate(self, net: nn.Module, task: Any, step: int) -> dict[str, float]:
        r, d = self.r, self.d
        rows = task.eval_rows
        mb = r.train.micro_batch_size
        net.eval()
        sums: dict[str, float] = {}
        units = 0.0
        n_batches = -(-len(rows) // (mb * d.world))
        if r.eval.max_batches:
            n_batches = min(n_batches, r.eval.max_batches)
        for b in range(n_batches):
            lo = (b * d.world + d.rank) * mb
            mine = [rows[i] for i in range(lo, min(lo + mb, len(rows)))]
            # Every process runs every batch (FSDP gathers weights collectively); a process
            # with no rows left runs a dummy batch that counts for nothing.
            weight = 1.0 if mine else 0.0
            mine = mine or [rows[0]]
            with _autocast(d.device, r.train.precision):
                _, stats = task.forward(net, self.model, mine, d.device)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + weight * v
            units += weight * task.units(mine)
        net.train()
        keys = sorted(sums)
        values = d.sum([sums[k] for k in keys] + [units])
        metrics = {
            f"eval_{k}": v
            for k, v in task.summarize(dict(zip(keys, values, strict=False)), values[-1]).items()
        }
        self._log({"kind": "eval", "step": step, **metrics})
        self.say(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    # -- progress ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _progress(self, total: int, start: int) -> Iterator[None]:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total,
            initial=start,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.d.is_main and self.r.log.progress),
            file=sys.stderr,
        )
        try:
            yield
        finally:
            self._bar.close()
            self._bar = None

    def _bar_update(self, record: dict[str, Any]) -> None:
        bar = self._bar
        if bar is None or bar.disable:
            return
        bar.set_postfix_str(
            f"loss {record['loss']:.4f}, lr {record['lr']:.2e}, {record['tokens_per_s']:.0f} tok/s",
            refresh=False,
        )
        bar.update(1)

    def _plot(self) -> bool:
        from qwenlm.train.plot import plot_losses

        return plot_losses(
            self.log_path,
            self.out / "loss.png",
            title=f"{self.r.task} / {self.r.method}: {self.out.name}",
        )

    # -- saving and resuming -------------------------------------------------------------------
    def _trainable_state(self, net: nn.Module) -> dict[str, torch.Tensor]:
        """Full (unsharded) trainable weights under the model's names; on the main process."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            net,
            options=StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=True
            ),
        )
        state = {k.removeprefix("lm."): v for k, v in state.items()}
        if self.r.method != "full":  # frozen buffers (NF4 weights) come along; keep the adapter
            state = {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}
        return state

    def _write_weights(self, folder: Path, state: dict[str, torch.Tensor]) -> None:
        if self.r.method == "full":
            from qwenlm.weights.hf_writer import write_hf_folder

            write_hf_folder(
                folder,
                config=self.config,
                tensors=state,
                tokenizer=self.tok,
                chat_template=self.template_src,
                dtype=torch.float32 if self.r.dtype == "float32" else torch.bfloat16,
            )
        else:
            cfg = adapter_config(
                self.model, base_model=self.r.model, target_modules=list(self.r.lora.target_modules)
            )
            save_adapter(folder, cfg, state)

    def _save(self, step: int, net: nn.Module, opt: torch.optim.Optimizer) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        d = self.d
        state = self._trainable_state(net)
        osd = get_optimizer_state_dict(
            net, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        rng = {f"cpu.{i}": t for i, t in enumerate(d.gather(torch.get_rng_state()))}
        if d.device.type == "cuda":
            cuda = d.gather(torch.cuda.get_rng_state(d.device))
            rng.update({f"cuda.{i}": t for i, t in enumerate(cuda)})

        def write(part: Path) -> None:
            self._write_weights(part, state)
            tensors, meta = flatten_optimizer_state(osd)
            write_tensors(part / "optimizer.safetensors", tensors)
            write_json(part / "optimizer.json", meta)
            write_tensors(part / "rng.safetensors", rng)
            write_json(
                part / "trainer.json",
                {
                    "step": step,
                    "world_size": d.world,
                    "global_batch": self.r.train.micro_batch_size
                    * self.r.train.grad_accum
                    * d.world,
                    "seed": self.r.train.seed,
                    "task": self.r.task,
                    "method": self.r.method,
                    **self.fingerprint,
                    "time": time.time(),
                },
            )

        failed = None
        if d.is_main:
            try:
                self.ckpts.save(step, write)
            except QwenlmError as e:
                failed = e
        if d.any(failed is not None):  # every process stops, not only the one that saved
            raise failed or TrainError(f"the main process could not save checkpoint step {step}")
        d.barrier()

    def _resume(self, net: nn.Module, opt: torch.optim.Optimizer, force: bool) -> int:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        d = self.d
        if d.is_main:
            self.ckpts.clean_partials()
        d.barrier()
        path = self.ckpts.latest(warn=self.say)
        # Every process must resume from the same checkpoint: take the main process's choice.
        step = int(self.d.sum([float(int(path.name[5:])) if path and d.is_main else 0.0])[0])
        if step == 0:
            self.say(f"no usable checkpoint in {self.ckpts.root}; starting from step 0")
            if d.is_main:
                self.log_path.unlink(missing_ok=True)
            return 0
        path = self.ckpts.path(step)
        trainer = read_json(path / "trainer.json")
        for key, what in (("data_sha256", "data"), ("recipe_sha256", "recipe")):
            if trainer.get(key) not in (None, self.fingerprint[key]):
                message = (
                    f"checkpoint {path} was trained with other {what} (sha256 "
                    f"{str(trainer[key])[:12]}..., now {self.fingerprint[key][:12]}...)"
                )
                if not force:
                    raise TrainError(
                        message + "; resuming would not reproduce the run",
                        hint="restore the original data and recipe, or pass --force-resume",
                    )
                self.say(f"warning: {message}; continuing anyway (--force-resume)")
        G = self.r.train.micro_batch_size * self.r.train.grad_accum * d.world
        if trainer.get("global_batch") != G or trainer.get("seed") != self.r.train.seed:
            self.say(
                f"warning: the checkpoint was trained with global batch "
                f"{trainer.get('global_batch')} "
                f"and seed {trainer.get('seed')}, this run uses {G} and {self.r.train.seed}: the "
                "data order from here on differs from the original run's"
            )
        if self.r.method == "full":
            weights = read_tensors(path / "model.safetensors")
        else:
            read_adapter_config(path)
            weights = {
                k.removeprefix("base_model.model."): v
                for k, v in read_tensors(path / "adapter_model.safetensors").items()
            }
        set_model_state_dict(
            net,
            {f"lm.{k}": v for k, v in weights.items()},
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
        osd = unflatten_optimizer_state(
            read_tensors(path / "optimizer.safetensors"), read_json(path / "optimizer.json")
        )
        set_optimizer_state_dict(net, opt, osd, options=StateDictOptions(full_state_dict=True))
        rng = read_tensors(path / "rng.safetensors")
        if f"cpu.{d.rank}" in rng and trainer.get("world_size") == d.world:
            torch.set_rng_state(rng[f"cpu.{d.rank}"])
            if d.device.type == "cuda" and f"cuda.{d.rank}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda.{d.rank}"], d.device)
        else:
            torch.manual_seed(self.r.train.seed + step * 1_000 + d.rank)
        if d.is_main:
            self._truncate_log(step)
        self.say(f"resumed from {path} (step {step})")
        return step

    def _truncate_log(self, step: int) -> None:
        """Drop log records written after the checkpoint: the resumed run writes them again."""
        from qwenlm.train.plot import read_log

        kept = [rec for rec in read_log(self.log_path) if rec.get("step", 0) <= step]
        text = "".join(json.dumps(rec) + "\n" for rec in kept)
        atomic_write(self.log_path, lambda p: p.write_text(text, encoding="utf-8"))

    def _finish(self, net: nn.Module) -> None:
        """The run's product in ``out``: a PEFT adapter, or a Hugging Face model folder."""
        state = self._trainable_state(net)
        if self.d.is_main:
            self._write_weights(self.out, state)
            what = "adapter" if self.r.method != "full" else "model"
            self.say(f"{what} saved in {self.out}")
        self.d.barrier()
