"""Run by test_train.py under `torchrun --nproc_per_node 2`: a few DDP steps of the toy task on CPU (gloo).

Each rank starts from different random weights on purpose (DDP must broadcast rank 0's), trains on its own
batches, and writes its final state dict to OUT/rank{R}.pt for the test to compare.
"""

import sys
from pathlib import Path

import torch

from mmcore.recipes import ToyRecipe
from mmcore.train import Trainer, TrainConfig, distributed_env


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank, world, _ = distributed_env()
    recipe = ToyRecipe(eval_samples=2)
    tokenizer = recipe.build_tokenizer(out)
    torch.manual_seed(100 + rank)
    model = recipe.build_model(tokenizer)
    model.tokenizer = tokenizer
    cfg = TrainConfig(steps=3, batch_size=2, grad_accum=2, lr=1e-3, warmup_steps=1, log_every=1, progress=False)
    trainer = Trainer(model, cfg, lambda s, m, r, w: recipe.batch(s, m, r, w, cfg.batch_size, tokenizer),
                      out_dir=out, card={"recipe": "toy"})
    summary = trainer.fit()
    torch.save({"state": model.state_dict(), "world": world, "step": summary["step"]}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
