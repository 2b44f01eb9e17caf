"""Distillation losses on logits: forward and reverse KL with a temperature, mixed with the
cross-entropy (`docs/post_training.md`, "Distillation").

Per-token arrays are [B, S]; logits [B, S, V]. Sums are over the masked-in tokens, and the
caller divides by the batch's tokens, so micro-batches combine exactly.
"""

import jax
import jax.numpy as jnp

from jaxllm.train.step import cross_entropy


def _log_probs(logits, temperature: float):
    return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def forward_kl(student_logits, teacher_logits, temperature: float = 1.0):
    """[B, S] T^2 * KL(p_teacher || p_student), both softened by T (Hinton et al. 2015)."""
    log_s, log_t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    return temperature**2 * (jnp.exp(log_t) * (log_t - log_s)).sum(-1)


def reverse_kl(student_logits, teacher_logits, temperature: float = 1.0):
    """[B, S] T^2 * KL(p_student || p_teacher), both softened by T (MiniLLM, Gu et al. 2023)."""
    log_s, log_t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    return temperature**2 * (jnp.exp(log_s) * (log_s - log_t)).sum(-1)


KL = {"forward": forward_kl, "reverse": reverse_kl}


def distill_sums(student_logits, teacher_logits, targets, loss_mask, *, kind: str,
                 alpha: float, temperature: float, z_loss: float = 0.0) -> dict:
    """Summed masked terms of loss = alpha * KL + (1 - alpha) * CE: "loss" (that mix), "kl",
    "ce" (the student's cross-entropy on `targets`), "z_loss" and "tokens".

    The teacher's logits carry no gradient.
    """
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    kl = (KL[kind](student_logits, teacher_logits, temperature) * loss_mask).sum()
    ce, z_term, tokens = cross_entropy(student_logits, targets, loss_mask, z_loss)
    return {"loss": alpha * kl + (1 - alpha) * ce, "kl": kl, "ce": ce, "z_loss": z_term,
            "tokens": tokens}
