"""What routing costs inside the routed prefill: the pipeline's prefill with the switch at layer K (it
routes inside the forward) against the same prefill with every sequence's adapter given, timed
alternately in one run; plus the switch op and the routing plan alone.

    python benchmarks/bench_switch_cost.py                   # SmolLM2-135M-Instruct, K = 0 and 2
    python benchmarks/bench_switch_cost.py --smoke           # a tiny random Llama (CI)

The model carries 8 random rank-16 adapters on every linear layer ≥ K (as a run with switch layer K
trains them); the prefill is a batch of random prompts, one new token each (``generate_ids`` with
``max_new_tokens = 1``). The switch (random, gate open) spreads the prompts over the adapters; the
"adapters given" prefill gets exactly the adapters it picked, so both do the same LoRA work and their
difference is what routing costs. Routing runs once per request, in the prefill, never per decoded token.
"""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import gemm_gflops, run_metadata, tiny_llama, write_results
from switchcit import load_adapters
from switchcit.ops import build_routing_plan, switch_route
from switchcit.pipeline import SwitchModel
from switchcit.switch import Switch

ADAPTERS = tuple(f"task{i}" for i in range(8))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def banked_model(base_folder: str, layer: int, rank: int = 16):
    """The base model with 8 random adapters on every linear layer from ``layer`` up."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_folder)
    layers = list(range(layer, base.config.num_hidden_layers))
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, layers_to_transform=layers,
                        init_lora_weights=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, config, adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        peft_model.add_adapter(name, config)
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder)
        model = load_adapters(AutoModelForCausalLM.from_pretrained(base_folder),
                              {name: Path(folder) / name for name in ADAPTERS})
    return model, AutoTokenizer.from_pretrained(base_folder)


def random_switch(hidden: int, layer: int, gen: torch.Generator, per_task: int = 50) -> Switch:
    """A switch fitted on random task clusters (its cost does not depend on what it learned)."""
    centres = torch.randn(len(ADAPTERS), hidden, generator=gen)
    features = torch.cat([c + 0.3 * torch.randn(per_task, hidden, generator=gen) for c in centres])
    labels = [task for task in ADAPTERS for _ in range(per_task)]
    return Switch.fit(features, features, labels, layer=layer, gate_margin=math.inf)  # open gate: adapters mixed


def interleaved_ms(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    """Median ms of each function, their calls alternated (a busy neighbour slows all of them alike)."""
    samples = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in samples.items()}


def measure(base_folder: str, layer: int, batch: int, seq_len: int, repeats: int) -> dict:
    model, tokenizer = banked_model(base_folder, layer)
    gen = torch.Generator().manual_seed(layer)
    pipeline = SwitchModel(model, tokenizer, random_switch(model.config.hidden_size, layer, gen))
    assert pipeline.one_pass
    prompts = torch.randint(100, model.config.vocab_size, (batch, seq_len), generator=gen).tolist()
    limits, stops = [1] * batch, []
    with torch.no_grad():  # the adapters the switch picks, given explicitly: both prefills do the same LoRA work
        explicit = pipeline.generate_ids(prompts, limits, stops)[1].long()
    hidden = torch.randn(batch, seq_len, model.config.hidden_size, generator=gen)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    head, task_to_adapter = pipeline.switch.head(), pipeline.task_to_adapter()
    token_ids = torch.randint(-1, len(ADAPTERS), (batch * seq_len,), generator=gen)
    with torch.no_grad():
        ms = interleaved_ms({
            "prefill, adapters given": lambda: pipeline.generate_ids(prompts, limits, stops, explicit),
            "prefill, switch routes at layer K": lambda: pipeline.generate_ids(prompts, limits, stops),
            "switch op alone (pool + MLP + gate + ids)":
                lambda: switch_route(hidden, hidden, mask, head, task_to_adapter),
            "routing plan alone": lambda: build_routing_plan(token_ids, len(ADAPTERS)),
        }, repeats)
    given, routed = ms["prefill, adapters given"], ms["prefill, switch routes at layer K"]
    return {"layer": layer, "batch": [batch, seq_len], "ms": ms, "adapters_used": sorted(set(explicit.tolist())),
            "routing_percent": 100 * (routed - given) / routed,
            "switch_and_plan_percent": 100 * (ms["switch op alone (pool + MLP + gate + ids)"]
                                              + ms["routing plan alone"]) / routed}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--layers", default="0,2", help="switch layers K, comma-separated")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama, few repeats (CI)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.smoke:
        args.base = str(tiny_llama(Path(tempfile.mkdtemp())))
        args.layers, args.batch, args.seq_len, args.repeats = "0,1", 4, 16, 2
    elif args.base is None:
        from switchcit.pretrained import smollm2_135m_instruct

        args.base = str(smollm2_135m_instruct())
    rows = [measure(args.base, int(k), args.batch, args.seq_len, args.repeats) for k in args.layers.split(",")]
    meta = run_metadata(torch.device("cpu")) | {
        "model": Path(args.base).name, "float32 GEMM 1024³ GFLOP/s (same run)": round(gemm_gflops(), 1),
        "command": "python benchmarks/bench_switch_cost.py" + (" --smoke" if args.smoke else
                                                               f" --layers {args.layers} --batch {args.batch}"
                                                               f" --seq-len {args.seq_len} --repeats {args.repeats}"),
    }
    names = list(rows[0]["ms"])
    header = ["K", *(f"{n} (ms)" for n in names), "routing / routed prefill", "switch op + plan / routed prefill"]
    table = [[str(r["layer"]), *(f"{r['ms'][n]:.2f}" for n in names), f"{r['routing_percent']:.2f}%",
              f"{r['switch_and_plan_percent']:.3f}%"] for r in rows]
    name = "switch-cost-smoke" if args.smoke else "switch-cost-cpu"
    _, md = write_results(args.out, name, "Routing cost inside the routed prefill", meta, rows, header, table,
                          notes=__doc__)
    print(md.read_text())


if __name__ == "__main__":
    main()
