"""A plain PyTorch DPO loop with graddyn capture, on the shipped default model.

python examples/plain_pytorch_dpo.py runs/plain 20
graddyn targets runs/plain && graddyn replay runs/plain && graddyn analyze runs/plain
"""

import copy
import sys

import torch

from graddyn.capture.session import CaptureConfig, CaptureSession
from graddyn.checkpoints import save_parameters
from graddyn.data.batches import PairTokenizer
from graddyn.data.pairs import load_pairs, split_pairs
from graddyn.logprobs import sequence_logprobs
from graddyn.losses.dpo import dpo_loss, sequence_id
from graddyn.models import load_model, load_tokenizer


def train(run_dir, steps=20, n=4, beta=0.1, lr=1e-4, capture=True, model="default"):
    torch.manual_seed(0)
    train_pairs, _ = split_pairs(load_pairs().pairs)
    pairs = PairTokenizer(load_tokenizer(model), train_pairs, 96, 48)
    policy = load_model(model)
    reference = copy.deepcopy(policy).requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    session = (
        CaptureSession(
            policy,
            run_dir,
            CaptureConfig(every=5),
            steps,
            {"loss": "dpo", "beta": beta, "model": model},
        )
        if capture
        else None
    )
    for step in range(steps):
        ids = torch.tensor([p.pair_id for p in train_pairs[step * n : (step + 1) * n]])
        batch = pairs.batch(ids.tolist())  # rows: n chosen, then n rejected
        session and session.start_step(step)  # before the forward pass
        with torch.no_grad():
            ref = sequence_logprobs(reference, batch)
        logp = sequence_logprobs(policy, batch)
        out = dpo_loss(logp[:n], logp[n:], ref[:n], ref[n:], ids, beta)
        rows = torch.cat([sequence_id(ids, 0), sequence_id(ids, 1)])
        session and session.observe(out.items, out.loss, batch, rows, {"logp_reference": ref})
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        session and session.end_step({"pair_ids": ids}, learning_rate=lr)
    if session:
        session.close()
        save_parameters(policy, f"{run_dir}/checkpoints/final.safetensors")
    return policy


if __name__ == "__main__":
    train(
        sys.argv[1] if len(sys.argv) > 1 else "runs/plain",
        int(sys.argv[2]) if len(sys.argv) > 2 else 20,
    )
