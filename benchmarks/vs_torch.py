"""Our jitted OPD update step vs the PyTorch eager reference on the same weights and batch.

The reference is what a PyTorch user would write: transformers' ``Qwen3ForCausalLM`` (loaded from our weights
saved with ``qwen3.save_hf``), the same OPD loss in torch (full fp32 log-softmax, PPO-clip with the advantage
detached, per-sequence mean), ``clip_grad_norm_`` and ``torch.optim.AdamW`` with the same hyper-parameters.
Runs alternate (jax, torch, jax, torch, ...) so both sides see the same machine load. torch is imported inside the
functions that use it: this module imports where torch is not installed (benchmarks.run then skips the section).
"""

from __future__ import annotations

import tempfile
from typing import Any

import jax
import numpy as np

from benchmarks import common
from benchmarks.train_step import build_step, compile_step, make_state, run_steps
from lopd_jax import losses, update
from lopd_jax.data.batch import Batch
from lopd_jax.models import qwen3
from lopd_jax.models.qwen3 import Qwen3Config


def torch_model(cfg: Qwen3Config, params: Any, tmp: str):
    """transformers' Qwen3ForCausalLM holding exactly ``params`` (fp32, eval-free: no dropout in Qwen3)."""
    import torch
    from transformers import AutoModelForCausalLM

    qwen3.save_hf(tmp, cfg, params)
    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, trust_remote_code=False)
    return model.train()


def torch_opd_loss(model, batch: dict, loss_cfg: losses.LossConfig):
    """losses.opd_loss in torch (one sequence per row, sample_mean): returns the scalar loss.

    logp = log_softmax(logits)[targets]; A = (teacher - logp.detach()) * mask; ratio = exp(logp - logp.detach());
    per-token loss max(-ratio A, -clip(ratio) A); mean over each row's response tokens, averaged over rows."""
    import torch

    logits = model(input_ids=batch["inputs"], position_ids=batch["positions"]).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 statistics; a float64 model keeps f64
    logp = torch.log_softmax(logits, dim=-1).gather(-1, batch["targets"][..., None])[..., 0]
    old = logp.detach()
    mask = batch["loss_mask"]
    adv = (batch["teacher_logprobs"] - old) * mask
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1 - loss_cfg.clip_eps_low, 1 + loss_cfg.clip_eps_high)
    pg = torch.maximum(-ratio * adv, -clipped * adv)
    per_seq = (pg * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq.sum() / (mask.sum(-1) > 0).sum().clamp(min=1)


class TorchStep:
    """One eager training step: forward, loss, backward, grad-norm clip, AdamW (update.OptimizerConfig's values)."""

    def __init__(self, model, opt_cfg: update.OptimizerConfig, loss_cfg: losses.LossConfig):
        import torch

        self.model, self.opt_cfg, self.loss_cfg = model, opt_cfg, loss_cfg
        self.opt = torch.optim.AdamW(
            model.parameters(),
            lr=opt_cfg.lr,
            betas=(opt_cfg.b1, opt_cfg.b2),
            eps=opt_cfg.eps,
            weight_decay=opt_cfg.weight_decay,
        )

    def __call__(self, batch: dict) -> tuple[float, float]:
        loss = self._backward(batch)
        return loss, self._clip_and_step()

    def first_step(self, batch: dict) -> tuple[float, float, float]:
        """A step as ``__call__``, also returning the gradients' float64-summed norm (taken before the clip)."""
        loss = self._backward(batch)
        norm_f64 = grads_norm_f64(self.model)
        return loss, self._clip_and_step(), norm_f64

    def _backward(self, batch: dict) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = torch_opd_loss(self.model, batch, self.loss_cfg)
        loss.backward()
        return float(loss.detach())

    def _clip_and_step(self) -> float:
        """clip_grad_norm_ (returns its pre-clip norm, the figure a PyTorch user logs) and the AdamW step."""
        import torch

        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.opt_cfg.grad_clip)
        self.opt.step()
        return float(grad_norm)


def grads_norm_f64(model) -> float:
    """The global norm of ``model``'s current gradients, summed in float64.

    ``clip_grad_norm_``'s own figure is not an accurate fp32 norm on CPU: torch's fp32 ``vector_norm`` sums into plain
    fp32 accumulators (pytorch/pytorch#68326, #169237), -4e-11 relative per element, so a 32,000 x 512 embedding
    gradient reads 4e-4 low and the 35M model's norm 1e-4 low while its gradients are right to 1e-7."""
    import torch

    sq = sum(torch.sum(p.grad.double() ** 2) for p in model.parameters() if p.grad is not None)
    return float(torch.sqrt(sq))


def torch_batch(batch: Batch) -> dict:
    import torch

    return {
        "inputs": torch.from_numpy(np.asarray(batch.inputs, np.int64)),
        "targets": torch.from_numpy(np.asarray(batch.targets, np.int64)),
        "positions": torch.from_numpy(np.asarray(batch.positions, np.int64)),
        "loss_mask": torch.from_numpy(np.asarray(batch.loss_mask)),
        "teacher_logprobs": torch.from_numpy(np.asarray(batch.teacher_logprobs)),
    }


def bench_vs_torch(cfg: Qwen3Config, batch_size: int, seq_len: int, rounds: int, steps_per_round: int) -> dict:
    """Alternate ``rounds`` x (``steps_per_round`` jax steps, then as many torch steps) from the same weights.

    Also checks the two sides agree: the first step's loss and pre-clip gradient norm (fp32 both sides; torch's also
    summed in float64, see grads_norm_f64)."""
    opt_cfg = update.OptimizerConfig(lr=1e-5)
    loss_cfg = losses.LossConfig()
    built = build_step(cfg, loss_cfg, lr=opt_cfg.lr)  # the trainer's own step (lopd_jax.training.step.build)
    state = make_state(built, cfg)
    host_batch = common.synthetic_batch(cfg, batch_size, seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        tstep = TorchStep(torch_model(cfg, state.params, tmp), opt_cfg, loss_cfg)
    tb = torch_batch(host_batch)
    batch = jax.device_put(host_batch)
    compiled, compile_s, _ = compile_step(built.step, state, batch)
    state, metrics = compiled(state, batch)
    t_loss, t_norm, t_norm_f64 = tstep.first_step(tb)  # step 1 on both sides from identical weights
    check = {
        "jax_loss": float(metrics["train/loss"]),
        "torch_loss": t_loss,
        "jax_grad_norm": float(metrics["train/grad_norm"]),
        "torch_grad_norm": t_norm,  # what clip_grad_norm_ returned (and clipped with)
        "torch_grad_norm_f64": t_norm_f64,  # the same gradients' norm, summed in float64
    }
    threads = common.torch_thread_counts()
    jax_t, torch_t = [], {n: [] for n in threads}
    for _ in range(rounds):
        state, times = run_steps(compiled, state, batch, steps_per_round)
        jax_t.append(float(np.mean(times)))
        for n in threads:
            with common.torch_threads(n):
                tstep(tb)  # one untimed step after a thread-count change (pool start-up)
                torch_t[n].append(float(np.mean([common.timed(lambda: tstep(tb)) for _ in range(steps_per_round)])))
    jax_s = common.spread(jax_t)
    best, by_threads = common.best_of(torch_t)
    torch_s = by_threads[best]
    tokens = batch_size * seq_len
    return {
        "model": {"hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size},
        "params": qwen3.param_count(cfg),
        "forms": common.forms_of(cfg),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "rounds": rounds,
        "steps_per_round": steps_per_round,
        "jax_step_s": jax_s,
        "torch_step_s": torch_s,
        "torch_threads": int(best),
        "torch_step_s_by_threads": by_threads,
        "jax_tokens_per_s": tokens / jax_s["median"],
        "torch_tokens_per_s": tokens / torch_s["median"],
        "speedup": common.ratio(torch_s, jax_s),
        "jax_compile_s": compile_s,
        "torch_attention": getattr(tstep.model.config, "_attn_implementation", None),
        "agreement": check,
    }
