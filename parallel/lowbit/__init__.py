"""Low-bit training: 8-bit block-wise and NF4 codes (`quant`), 8-bit AdamW (`adamw8bit`), NF4 base
weights with LoRA adapters and their PEFT file format (`lora`), and fp16 dynamic loss scaling."""
