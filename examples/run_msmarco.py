"""Train a dense retriever on MS MARCO (or your own files) with ContAccum: the installed
`contaccum-train` command, kept here so that `accelerate launch examples/run_msmarco.py` works.

    accelerate launch examples/run_msmarco.py --output_dir out --memory_bank_size 1024
        --per_device_train_batch_size 8 --gradient_accumulation_steps 16 --max_memory_gb 11

`python examples/run_msmarco.py --help` shows the file formats first, then every option.
"""
from hf_contaccum.cli import DataArguments, ModelArguments, main

__all__ = ["DataArguments", "ModelArguments", "main"]

if __name__ == "__main__":
    main()
