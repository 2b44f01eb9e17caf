"""The DPO-family losses and their metrics, as pure functions of per-sequence log-probs.

A batch holds P pairs as 2P rows, the chosen rows then the rejected rows
(`jaxllm.post.preferences`). With π the policy's and π_ref the reference's log-prob of a
response given its prompt, and h = (π_c − π_ref,c) − (π_r − π_ref,r):

    sigmoid (DPO eq. 7; cDPO if ε > 0): (1 − ε)·(−log σ(β h)) + ε·(−log σ(−β h))
    ipo (IPO eq. 17):                   (h − 1/(2β))²

IPO uses each response's log-prob averaged over its tokens, as TRL does; DPO sums them. The
rewards β(π − π_ref) use the same log-probs. `docs/post_training.md` gives the sources.
"""

import jax
import jax.numpy as jnp

from jaxllm.config import DPOConfig


def sequence_logps(token_logps, mask):
    """[B] summed log-probs of the masked tokens of each row of [B, S] `token_logps`."""
    return (token_logps * mask).sum(-1)


def pair_losses(h, *, beta: float, loss: str, label_smoothing: float = 0.0):
    """[P] losses of the pairs' log-ratio differences `h`."""
    if loss == "ipo":
        return jnp.square(h - 1.0 / (2.0 * beta))
    return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
            - label_smoothing * jax.nn.log_sigmoid(-beta * h))


def dpo_loss(policy_logps, ref_logps, lengths, cfg: DPOConfig):
    """(mean loss, metrics) of [2P] summed response log-probs, chosen rows first.

    `lengths` [2P] are the responses' token counts. The reference's log-probs are constants:
    no gradient flows into them.
    """
    ref_logps = jax.lax.stop_gradient(ref_logps)
    if cfg.loss == "ipo":
        lengths = jnp.maximum(lengths, 1)
        policy_logps, ref_logps = policy_logps / lengths, ref_logps / lengths
    chosen, rejected = jnp.split(policy_logps, 2)
    ref_chosen, ref_rejected = jnp.split(ref_logps, 2)
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    losses = pair_losses(h, beta=cfg.beta, loss=cfg.loss, label_smoothing=cfg.label_smoothing)
    chosen_rewards = cfg.beta * jax.lax.stop_gradient(chosen - ref_chosen)
    rejected_rewards = cfg.beta * jax.lax.stop_gradient(rejected - ref_rejected)
    loss = losses.mean()
    metrics = {
        "loss": loss,
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32).mean(),
        "logps/chosen": jax.lax.stop_gradient(chosen).mean(),
        "logps/rejected": jax.lax.stop_gradient(rejected).mean(),
    }
    return loss, metrics
