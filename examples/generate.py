"""Generate text from a trained model with MLA's latent KV cache.

    python examples/generate.py --checkpoint runs/default --prompt "def " --max-new-tokens 64
        [--temperature 0.8] [--top-k 40] [--top-p 0.95] [--greedy] [--no-cache] [--absorb] [--seed 0]

`--checkpoint` is a run folder (its `final/` weights are used) or any folder that directly holds
`model.safetensors` + `config.json` (MLAConfig fields, as the trainer writes them; a Hugging Face
DeepSeek folder, such as a run's `final/`, is read with `models.deepseek.load_pretrained`) +
`tokenizer.json` (or pass `--tokenizer`). Decoding stops at the folder's end token (`eos_token_id` of its
`generation_config.json`, else `<|endoftext|>`); the prompt starts with its begin token when the run's
`mla_run.json` names one. The text goes to stdout; a line of statistics (speed,
cache size against standard multi-head attention) goes to stderr. One process, on CUDA when available.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import tokenizers
import torch
from safetensors.torch import load_file

from models.config import MLAConfig
from models.generate import LatentKVCache, cache_numbers_per_token, generate
from models.transformer import MLATransformer

EOT = "<|endoftext|>"


def weights_folder(path: Path) -> Path:
    """The folder holding model.safetensors: `path` itself or its `final/`."""
    for folder in (path, path / "final"):
        if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
            return folder
    raise ValueError(
        f"--checkpoint={str(path)!r}: no model.safetensors + config.json there or in its final/ folder"
    )


def load_model(folder: Path, device: torch.device, dtype: torch.dtype) -> MLATransformer:
    raw = json.loads((folder / "config.json").read_text())
    if "model_type" in raw:  # a Hugging Face DeepSeek folder
        from models.deepseek import load_pretrained

        return load_pretrained(str(folder)).to(device=device, dtype=dtype).eval()
    unknown = set(raw) - set(MLAConfig.field_names())
    if unknown:
        raise ValueError(f"{folder / 'config.json'}: unknown MLAConfig fields {sorted(unknown)}")
    model = MLATransformer(MLAConfig(**raw))
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(folder: Path, given: str | None) -> tokenizers.Tokenizer:
    candidates = [Path(given)] if given else [folder / "tokenizer.json", folder.parent / "tokenizer.json"]
    for path in candidates:
        if path.is_file():
            return tokenizers.Tokenizer.from_file(str(path))
    where = given or f"{folder}/tokenizer.json"
    raise ValueError(f"--tokenizer: no tokenizer at {where!r} (pass --tokenizer path/to/tokenizer.json)")


def special_ids(folder: Path, tokenizer: tokenizers.Tokenizer) -> tuple[int | None, int | None]:
    """(eos id, bos id to start prompts with) of a weights folder; see the module docstring."""
    generation, run = folder / "generation_config.json", folder / "mla_run.json"
    eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    eos = eos[0] if isinstance(eos, list) else eos
    bos_token = json.loads(run.read_text()).get("bos_token") if run.is_file() else None
    bos = None if bos_token is None else tokenizer.token_to_id(bos_token)
    return (tokenizer.token_to_id(EOT) if eos is None else eos), bos


def prompt_ids(tokenizer: tokenizers.Tokenizer, prompt: str, eos: int | None, bos: int | None) -> list[int]:
    """The prompt's token ids as the run encoded documents: [bos] + text (no other special tokens)."""
    ids = ([] if bos is None else [bos]) + tokenizer.encode(prompt, add_special_tokens=False).ids
    if not ids:
        if eos is None:
            raise ValueError("--prompt: empty, and the tokenizer has no end token to start from")
        ids = [eos]
    return ids


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="run folder or folder with model.safetensors")
    parser.add_argument("--prompt", default="", help="text to continue (empty: start of a document)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix per token")
    parser.add_argument("--absorb", action="store_true", help="absorbed-weight attention over the latents")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args(argv)
    try:
        folder = weights_folder(Path(args.checkpoint))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        model = load_model(folder, device, dtype)
        tokenizer = load_tokenizer(folder, args.tokenizer)
        eot, bos = special_ids(folder, tokenizer)
        prompt = prompt_ids(tokenizer, args.prompt, eot, bos)
        start = time.perf_counter()
        ids = generate(
            model,
            prompt,
            args.max_new_tokens,
            greedy=args.greedy,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=torch.Generator().manual_seed(args.seed),
            use_cache=not args.no_cache,
            absorb=args.absorb,
            eos_id=eot,
        )[0].tolist()
        seconds = time.perf_counter() - start
    except ValueError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    new = ids[len(prompt) :]
    if new and new[-1] == eot:
        new = new[:-1]
    text = args.prompt + tokenizer.decode(new)
    print(text)
    config = model.config
    produced = len(ids) - len(prompt)
    numbers = cache_numbers_per_token(config)
    cache_bytes = LatentKVCache.empty(config, 1, len(ids), device="meta", dtype=dtype).nbytes()
    mode = "no cache" if args.no_cache else "latent cache" + (", absorbed" if args.absorb else "")
    print(
        f"{produced} tokens in {seconds:.2f} s ({produced / max(seconds, 1e-9):.1f} tok/s, {mode}); cache "
        f"{cache_bytes / 1024:.1f} KiB for {len(ids)} tokens: {numbers['mla']} numbers per token and layer "
        f"against {numbers['mha']} for multi-head attention ({numbers['mha'] / numbers['mla']:.1f}x smaller)",
        file=sys.stderr,
    )
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
