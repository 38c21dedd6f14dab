"""Low-bit training: 8-bit block-wise and NF4 codes (`quant`), 8-bit AdamW (`adamw8bit`, its per-chunk
kernel in `adamw8bit_kernel`), frozen NF4 base weights (`nf4_linear`), LoRA adapters (`lora`) and their
PEFT file format (`peft_io`), and fp16 dynamic loss scaling."""

# quant first: parallel.lowbit.nf4 builds on it and quant re-exports nf4's names.
from parallel.lowbit import quant  # noqa: E402, F401
