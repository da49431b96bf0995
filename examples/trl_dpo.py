"""TRL's DPOTrainer with graddyn capture, on the shipped default model and bundled data.

pip install 'graddyn[trl]'
python examples/trl_dpo.py runs/trl 20
graddyn targets runs/trl && graddyn replay runs/trl && graddyn analyze runs/trl
"""

import sys

from datasets import Dataset
from trl import DPOConfig

from graddyn.capture.session import CaptureConfig
from graddyn.data.pairs import load_pairs, split_pairs
from graddyn.integrations.trl import GraddynDPOTrainer
from graddyn.models import default_model_path, load_model, load_tokenizer


def main(run_dir: str = "runs/trl", steps: int = 20, n_pairs: int | None = None) -> None:
    train_pairs, _ = split_pairs(load_pairs().pairs)
    train_pairs = train_pairs[:n_pairs]
    dataset = Dataset.from_list(
        [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in train_pairs]
    )
    args = DPOConfig(
        output_dir=f"{run_dir}.trl",  # TRL's own outputs, beside the graddyn run
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-4,
        beta=0.1,
        max_length=160,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=5,
    )
    trainer = GraddynDPOTrainer(
        model=load_model("default").train(),
        args=args,
        train_dataset=dataset,
        processing_class=load_tokenizer("default"),
        graddyn_run_dir=run_dir,
        graddyn_config=CaptureConfig(every=5),
    )
    trainer.train()
    print(f"captured run: {run_dir} (model: {default_model_path()})")


if __name__ == "__main__":
    main(
        sys.argv[1] if len(sys.argv) > 1 else "runs/trl",
        int(sys.argv[2]) if len(sys.argv) > 2 else 20,
    )
