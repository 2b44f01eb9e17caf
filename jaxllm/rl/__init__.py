"""Phase 2, RLVR: answer parsing and verifiers, rewards, GRPO losses and the update step."""
