"""A Llama in PyTorch with SPEED's visibility, and the Hugging Face files the engine loads.

One definition of SPEED lives here (`speed_key_visible`), used by training (`train_base.py`), by
SPEED-tuning (`speed_tune.py`) and by the test that holds it to the engine
(`test_speedllama.py`, which compares with `speedctl generate --json`). The rule is
docs/design.md §1: a prompt of n tokens has anchors [0, A), shallow tokens [A, n-T) and tail
[n-T, n); tokens after the prompt are generated (full depth). In layers l < C every token sees
every earlier token; in layers l >= C shallow tokens do not exist, so a query sees only earlier
anchors, tail and generated tokens (itself included).

Safetensors are read and written here by hand (the format is 8 bytes of header length, a JSON
header, then raw little-endian tensors), so nothing beyond Debian's python3-torch is needed.
"""

import json
import math
import os
import struct

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- configuration


class LlamaConfig:
    """The subset of a Hugging Face Llama config.json the engine reads."""

    def __init__(self, vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
                 num_key_value_heads, intermediate_size, max_position_embeddings=2048,
                 rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                 bos_token_id=None, eos_token_id=None, head_dim=None, torch_dtype="bfloat16"):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.tie_word_embeddings = tie_word_embeddings
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.torch_dtype = torch_dtype

    @classmethod
    def load(cls, model_dir):
        with open(os.path.join(model_dir, "config.json")) as f:
            c = json.load(f)
        if c.get("rope_scaling"):
            raise ValueError("%s: rope_scaling is not supported by speed-tune" % model_dir)
        return cls(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                   c.get("num_key_value_heads", c["num_attention_heads"]), c["intermediate_size"],
                   c.get("max_position_embeddings", 2048), c.get("rope_theta", 10000.0),
                   c.get("rms_norm_eps", 1e-5), c.get("tie_word_embeddings", False),
                   c.get("bos_token_id"), c.get("eos_token_id"), c.get("head_dim"),
                   c.get("torch_dtype", "bfloat16"))

    def save(self, model_dir):
        c = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype,
        }
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump(c, f, indent=2)
            f.write("\n")


# ---------------------------------------------------------------- SPEED visibility

ANCHOR, SHALLOW, TAIL, GENERATED = 0, 1, 2, 3


def token_classes(prompt_len, total_len, anchors, tail):
    """Class of each position of a prompt of prompt_len tokens followed by generated tokens."""
    cls = torch.full((total_len,), GENERATED, dtype=torch.long)
    cls[:prompt_len] = SHALLOW
    cls[max(prompt_len - tail, 0):prompt_len] = TAIL
    cls[:min(anchors, prompt_len)] = ANCHOR
    return cls


def speed_key_visible(classes, layer, cutoff):
    """[T, T] bool: may query i attend to key j at this layer. The one definition of SPEED.

    Causal everywhere. In layers >= cutoff shallow keys are absent. A shallow query there has no
    meaning (the engine never computes it); it is allowed to see itself so its softmax is defined,
    and nothing reads its output (its key is invisible to every other query).
    """
    n = classes.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    if layer < cutoff:
        return causal
    key_exists = classes != SHALLOW
    vis = causal & key_exists.unsqueeze(0)
    return vis | torch.eye(n, dtype=torch.bool)


def speed_masks(classes, n_layers, cutoff):
    """Per-layer additive masks [L][T, T] (0 visible, -inf hidden) for one sequence."""
    masks = []
    neg = torch.tensor(float("-inf"))
    for layer in range(n_layers):
        vis = speed_key_visible(classes, layer, cutoff)
        masks.append(torch.where(vis, torch.tensor(0.0), neg))
    return masks


# ---------------------------------------------------------------- the model


class RMSNorm(torch.nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_tables(cfg, n_pos, device):
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64, device=device) / hd))
    ang = torch.arange(n_pos, dtype=torch.float64, device=device).unsqueeze(1) * inv.unsqueeze(0)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class Layer(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = torch.nn.Linear(d, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = torch.nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = torch.nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = torch.nn.Linear(cfg.num_attention_heads * hd, d, bias=False)
        self.gate_proj = torch.nn.Linear(d, cfg.intermediate_size, bias=False)
        self.up_proj = torch.nn.Linear(d, cfg.intermediate_size, bias=False)
        self.down_proj = torch.nn.Linear(cfg.intermediate_size, d, bias=False)

    def forward(self, x, cos, sin, mask):
        cfg = self.cfg
        b, t, _ = x.shape
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(b, t, nh, hd).transpose(1, 2)
        k = self.k_proj(h).view(b, t, nkv, hd).transpose(1, 2)
        v = self.v_proj(h).view(b, t, nkv, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if nkv != nh:
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = att + mask.to(att.dtype)
        att = torch.softmax(att.float(), dim=-1).to(q.dtype)
        o = (att @ v).transpose(1, 2).reshape(b, t, nh * hd)
        x = x + self.o_proj(o)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = torch.nn.ModuleList([Layer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None
        if not cfg.tie_word_embeddings:
            self.lm_head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.checkpointing = False

    def init_weights(self, seed):
        g = torch.Generator().manual_seed(seed)
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                torch.nn.init.ones_(p)
            else:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * std)
                if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                    with torch.no_grad():
                        p.mul_(1.0 / math.sqrt(2 * self.cfg.num_hidden_layers))

    def forward(self, ids, masks):
        """ids [B, T]; masks: [L] of [T, T] or [B, 1, T, T] additive masks. Returns logits [B, T, V]."""
        t = ids.shape[1]
        cos, sin = rope_tables(self.cfg, t, ids.device)
        x = self.embed_tokens(ids)
        for layer, m in zip(self.layers, masks):
            if self.checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, m, use_reentrant=False)
            else:
                x = layer(x, cos, sin, m)
        x = self.norm(x)
        w = self.lm_head.weight if self.lm_head is not None else self.embed_tokens.weight
        return x @ w.t()


def causal_masks(n_layers, t, device=None):
    m = torch.full((t, t), float("-inf"), device=device).triu(1)
    return [m] * n_layers


# ---------------------------------------------------------------- Hugging Face names

def hf_names(cfg):
    """(our parameter name, Hugging Face tensor name) pairs."""
    pairs = [("embed_tokens.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    if not cfg.tie_word_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    sub = {
        "input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm",
        "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
        "down_proj": "mlp.down_proj",
    }
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in sub.items():
            pairs.append(("layers.%d.%s.weight" % (i, ours), "model.layers.%d.%s.weight" % (i, theirs)))
    return pairs


# ---------------------------------------------------------------- safetensors

_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def safetensors_read(path):
    """{name: tensor} of one safetensors file (F32/BF16/F16)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError("%s: too short for a safetensors file" % path)
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("%s: header length %d exceeds the file" % (path, n))
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = _ST_DTYPES.get(info["dtype"])
        if dt is None:
            raise ValueError("%s: tensor %s has unsupported dtype %s" % (path, name, info["dtype"]))
        a, b = info["data_offsets"]
        buf = bytearray(data[base + a:base + b])
        t = torch.frombuffer(buf, dtype=dt) if buf else torch.empty(0, dtype=dt)
        out[name] = t.reshape(info["shape"]).clone()
    return out


def safetensors_write(path, tensors):
    """Writes {name: tensor} (in name order) as one safetensors file."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for raw in blobs:
            f.write(raw)
    os.replace(tmp, path)


def load_checkpoint(model_dir, dtype=torch.float32):
    """A Llama from a Hugging Face directory (model.safetensors or an index of shards)."""
    cfg = LlamaConfig.load(model_dir)
    index = os.path.join(model_dir, "model.safetensors.index.json")
    tensors = {}
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        for fn in files:
            tensors.update(safetensors_read(os.path.join(model_dir, fn)))
    else:
        tensors = safetensors_read(os.path.join(model_dir, "model.safetensors"))
    model = Llama(cfg)
    state = {}
    for ours, theirs in hf_names(cfg):
        if theirs not in tensors:
            raise ValueError("%s: tensor %s is missing" % (model_dir, theirs))
        state[ours] = tensors[theirs].to(torch.float32)
    model.load_state_dict(state, strict=True)
    return cfg, model.to(dtype)


def save_checkpoint(model, model_dir, dtype=torch.bfloat16):
    """Writes config.json and model.safetensors (one file) in the Hugging Face layout."""
    cfg = model.cfg
    os.makedirs(model_dir, exist_ok=True)
    cfg.torch_dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    cfg.save(model_dir)
    params = dict(model.named_parameters())
    tensors = {theirs: params[ours].detach().to(dtype) for ours, theirs in hf_names(cfg)}
    safetensors_write(os.path.join(model_dir, "model.safetensors"), tensors)
