"""Manual check (not collected): real-size random Qwen3-VL-2B on CUDA, bf16 — parity spot-check and throughput.

python tests/vlm/realsize_cuda.py /work/shared/model-configs/Qwen3-VL-2B-Instruct  (or a copy of that folder)
"""

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from vlm_helpers import VL_TEMPLATE, hf_inputs, hf_render, rand_image, tokenizer_dir

from prefillonly import LLM


def main(cfg_dir: str) -> None:
    import transformers as tf

    cfg_dir = Path(cfg_dir)
    out = Path(tempfile.mkdtemp()) / "m"
    out.mkdir()
    shutil.copy(cfg_dir / "config.json", out / "config.json")
    shutil.copy(cfg_dir / "preprocessor_config.json", out / "preprocessor_config.json")
    config = tf.AutoConfig.from_pretrained(out)
    arch = config.architectures[0]
    t = time.time()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = getattr(tf, arch)._from_config(config, dtype=torch.bfloat16).eval()
    model.save_pretrained(out)
    for f in tokenizer_dir().iterdir():
        shutil.copy(f, out / f.name)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc["chat_template"] = VL_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(tc))
    print(f"built {arch} in {time.time() - t:.1f}s", flush=True)

    imgs = [rand_image(448 + 16 * (i % 5), 336 + 32 * (i % 3), i) for i in range(8)]
    chats = [[{"role": "user", "content": [{"type": "image", "image": imgs[i % 8]},
                                           {"type": "text", "text": f"Question {i}: is this a cat?"}]}] for i in range(8)]
    tok = tf.AutoTokenizer.from_pretrained(out)
    yes, no = (tok.encode(x, add_special_tokens=False)[0] for x in ("yes", "no"))
    refs = []
    for chat in chats[:4]:
        images = [chat[0]["content"][0]["image"]]
        inp = {k: v.cuda() for k, v in hf_inputs(out, tok, hf_render(tok, chat), images).items()}
        with torch.no_grad():
            lg = model(**inp).logits[0, -1, [yes, no]].float()
        refs.append(float(torch.softmax(lg, -1)[0]))
    del model
    torch.cuda.empty_cache()

    llm = LLM(out, dtype="bfloat16", device="cuda", use_tqdm=False)
    got = llm.classify(chats[:4], labels=["yes", "no"])
    print("p(yes) ours vs transformers bf16:", [(round(g.probs["yes"], 4), round(r, 4)) for g, r in zip(got, refs)])

    # throughput: distinct images (no cache hits) and repeated images (cache hits)
    for distinct in (True, False):
        n = 256
        pics = [rand_image(448, 448, 1000 + i) for i in range(n)] if distinct else imgs
        reqs = [[{"role": "user", "content": [{"type": "image", "image": pics[i % len(pics)]},
                                              {"type": "text", "text": f"Is item {i} a cat?"}]}] for i in range(n)]
        llm.model.encoder_cache.clear()
        llm.classify(reqs[:16], labels=["yes", "no"])  # warm up
        torch.cuda.synchronize()
        t = time.time()
        res = llm.classify(reqs, labels=["yes", "no"])
        torch.cuda.synchronize()
        dt = time.time() - t
        assert all(r.error is None for r in res)
        print(f"{'distinct' if distinct else 'repeated'} images: {n} requests in {dt:.2f}s = {n / dt:.1f} req/s; "
              f"encoder stats {llm.model.encoder_stats}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
