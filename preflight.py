"""Preflight: every input of a run checked in seconds, before anything is loaded, so that a cluster
job fails before it queues for GPUs rather than 20 minutes in. One table of checks on stdout, each
problem once, as one line on stderr, exit status 2.

    python train.py --preflight ...the run's flags...     # check_train_run below
    python evaluate.py --preflight ...the run's flags...  # evaluate.preflight, from the pieces here
    python train.py --dry-run                             # dry_run: 7B parameter counts and memory

- Checkpoints from their headers only: the same key and shape checks as the loaders (checkpoint.py),
  against the model built on the meta device. A safetensors file starts with an 8-byte
  little-endian header length and a JSON header listing every tensor's dtype, shape and byte range,
  so a 7B checkpoint is checked in milliseconds without reading its 13 GB; a pickled .bin is opened
  onto the meta device (no tensor data is read).
- The tokenizer against the embedding, the image size against the tower, the data in full (every
  image decoded), batches per rank, --out writable with room, GPU memory against --dry-run.
"""

import contextlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import data
from data import DataError, ImageProcessor, nearest_existing, group_names, load_image, load_tokenizer, one_line, read_llava_json, \
    recorded_attributes
from fairness import FairnessRegularizer
from lora import _adapter_weights, _from_peft_key, _lora_config_of, _read_adapter_config, apply_lora, count_parameters, \
    lora_state_dict, mark_only_lora_as_trainable, LoRAConfig
from checkpoint import (_llama_keys, _projector_keys, _vision_config, _vision_file, _vision_heads, _vision_trunk,
                        check_state_dict, read_llama_config, resolve_path, weight_files)
from fast import LOSS_CHUNK_ELEMENTS
from model import CheckpointError, Llama, LlamaConfig, LlavaModel, VisionConfig, VisionTransformer, build_projector
from train_io import INPUT_KINDS, check_out, check_resume_flags, run_inputs

GIB = 1024 ** 3


# ----------------------------------------------------------------------------------------------
# Checkpoints from their headers


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors_header(path):
    """{key: (dtype name, shape)} from a safetensors header. A file shorter than the byte ranges
    its header promises (a cut download) is a CheckpointError here rather than at load time."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, 100 * 2 ** 20):  # safetensors caps headers at 100 MB
            raise CheckpointError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    try:
        header.pop("__metadata__", None)
        end = max((t["data_offsets"][1] for t in header.values()), default=0)
        tensors = {k: (t["dtype"], tuple(t["shape"])) for k, t in header.items()}
    except (AttributeError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path}: malformed safetensors header ({e!r})") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, its header needs {8 + n + end})")
    return tensors


def checkpoint_shapes(path):
    """One weights file -> {key: meta tensor} with the stored shapes, no tensor data read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        return {k: torch.empty(shape, dtype=SAFETENSORS_DTYPES.get(dt, torch.float32), device="meta")
                for k, (dt, shape) in read_safetensors_header(path).items()}
    try:  # meta: the pickle is read for its structure, the storages are never materialised
        return torch.load(path, map_location="meta", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{path}: could not read weights ({type(e).__name__}: {e})") from None


def llama_shapes(path_or_repo):
    """An HF Llama folder -> (LlamaConfig, {key: meta tensor} of all its shards)."""
    folder = resolve_path(path_or_repo, ["*.json", "*.safetensors", "*.bin", "tokenizer*"])
    cfg = read_llama_config(folder)
    sd = {}
    for f in weight_files(folder):
        sd.update(checkpoint_shapes(f))
    return cfg, _llama_keys(sd, cfg)


def check_llama_files(path_or_repo):
    """load_llama's strict check without loading: -> (LlamaConfig, {key: meta tensor}), or a
    CheckpointError naming every missing, unexpected and mis-shaped key."""
    cfg, sd = llama_shapes(path_or_repo)
    with torch.device("meta"):
        model = Llama(cfg)
    check_state_dict(model.state_dict(), sd, str(path_or_repo))
    return cfg, sd


def check_vision_files(path_or_repo, num_heads=None):
    """load_vision_tower's checks without loading: -> (VisionConfig, weights file)."""
    f = _vision_file(resolve_path(path_or_repo, ["*.json", "*.bin", "*.safetensors"]))
    trunk = _vision_trunk(checkpoint_shapes(f), f)
    cfg = _vision_config(trunk, _vision_heads(f, num_heads), f)
    with torch.device("meta"):
        vit = VisionTransformer(cfg)
    check_state_dict(vit.state_dict(), trunk, str(f))
    return cfg, f


def vision_image_size(f):
    """The input size the files beside a vision checkpoint promise (open_clip_config.json's
    vision_cfg.image_size, or an HF preprocessor_config.json's crop size): {file: size}."""
    sizes, folder = {}, Path(f).parent
    oc, pp = folder / "open_clip_config.json", folder / "preprocessor_config.json"
    try:
        if oc.is_file():
            size = json.loads(oc.read_text())["model_cfg"]["vision_cfg"].get("image_size")
            if size is not None:
                sizes[str(oc)] = size[0] if isinstance(size, list) else size
        if pp.is_file():
            crop = json.loads(pp.read_text()).get("crop_size")
            if crop is not None:
                sizes[str(pp)] = crop.get("height") if isinstance(crop, dict) else crop
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{folder}: unreadable image-size config ({e!r})") from None
    return sizes


def check_projector_file(path, vision_width, hidden_size):
    """load_projector's check without loading: the mm_projector keys against an mlp2x_gelu of
    vision_width -> hidden_size."""
    found = _projector_keys(checkpoint_shapes(path), path)
    with torch.device("meta"):
        projector = build_projector(vision_width, hidden_size)
    check_state_dict(projector.state_dict(), found, str(path))


def _targets(t) -> list:
    return [t] if isinstance(t, str) else sorted(t)


def check_adapter_files(llm_cfg, adapter_dir: str, flags: LoRAConfig | None = None) -> LoRAConfig:
    """load_peft_adapter's checks without loading a tensor: the adapter's config against `flags`
    (training wraps the model with the flags' LoRA first, then loads the adapter into it; None: the
    adapter's own settings are used, as evaluation does), then the adapter's tensor shapes against
    a meta-device Llama of llm_cfg wrapped with those settings. -> the adapter's LoRAConfig."""
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    own = _lora_config_of(_read_adapter_config(config_path), config_path)
    if flags is not None:
        diff = [f"{name} {a} vs the flags' {b}" for name, a, b in
                (("r", own.r, flags.r), ("lora_alpha", own.alpha, flags.alpha),
                 ("target_modules", _targets(own.targets), _targets(flags.targets))) if a != b]
        if diff:
            raise CheckpointError(f"{config_path}: " + "; ".join(diff))
    with torch.device("meta"):
        llm = Llama(llm_cfg)
        apply_lora(llm, flags or own)
    path = _adapter_weights(adapter_dir)
    check_state_dict(lora_state_dict(llm), {_from_peft_key(k): v for k, v in checkpoint_shapes(path).items()}, path)
    return own


# ----------------------------------------------------------------------------------------------
# The table, and the checks train.py and evaluate.py share


LOCAL_MODEL_PATTERNS = {"--llm": ["*.json", "*.safetensors", "*.bin", "tokenizer*"],
                        "--vision": ["*.json", "*.bin", "*.safetensors"]}


class Preflight:
    """A table of checks, one row each: (name, "ok" | "problem" | "skipped", detail). A check is a
    function returning its detail line, or (detail, value) to hand a value to later checks; a
    ValueError or OSError it raises (CheckpointError and DataError are ValueErrors) becomes a
    problem row holding the error's one-line message."""

    def __init__(self):
        self.rows = []

    def check(self, name, fn):
        try:
            result = fn()
        except (ValueError, OSError) as e:
            self.rows.append((name, "problem", one_line(e)))
            return None
        detail, value = result if isinstance(result, tuple) else (result, None)
        self.rows.append((name, "ok", detail))
        return value

    def skip(self, name, why):
        self.rows.append((name, "skipped", why))

    def problems(self):
        return [f"{name}: {detail}" for name, status, detail in self.rows if status == "problem"]

    def report(self, prog):
        """Print the table on stdout, then each problem once, as one line on stderr (where every
        refusal of train.py and evaluate.py goes; its table row points there) -> the exit status
        (0 or 2)."""
        width = max(len(name) for name, _, _ in self.rows)
        print(f"{'check':<{width}}  {'result':<8}  detail")
        for name, status, detail in self.rows:
            print(f"{name:<{width}}  {status:<8}  {'(on stderr)' if status == 'problem' else detail}")
        problems = self.problems()
        print(f"preflight: {len(problems)} problem(s); " + ("the run would not start" if problems else "the run would start"),
              flush=True)  # the table before the problem lines, when both go to one log
        for line in problems:
            print(f"{prog}: preflight: {line}", file=sys.stderr)
        return 2 if problems else 0


def _find_input(path, kind, flag):
    """One input path -> (detail, resolved Path). kind: "file", "folder", "file or folder", or
    "model" (a local path, or a hub id already in the local cache: the preflight never downloads)."""
    if kind == "model":
        p = resolve_path(path, LOCAL_MODEL_PATTERNS.get(flag), cache_only=True)
        return (str(p) if str(p) == str(path) else f"{path} -> {p}"), p
    p = Path(path)
    ok = {"file": p.is_file(), "folder": p.is_dir(), "file or folder": p.exists()}[kind]
    if not ok:
        raise FileNotFoundError(f"{path}: {'no such ' + kind if not p.exists() else 'not a ' + kind}")
    return str(p), p


def preflight_paths(pf, inputs, required=()):
    """inputs {flag: (path or "", kind)} -> {flag: resolved Path} of those that resolve; one row each.
    An empty path is fine (the input is optional) unless its flag is in `required`."""
    found = {}
    for flag, (path, kind) in inputs.items():
        if not path:
            if flag in required:
                pf.check(f"path {flag}", lambda flag=flag: _raise(ValueError(f"{flag} is required")))
            continue
        p = pf.check(f"path {flag}", lambda path=path, kind=kind, flag=flag: _find_input(path, kind, flag))
        if p is not None:
            found[flag] = p
    return found


def _raise(e):
    raise e


def _llm_row(llm):
    cfg, sd = check_llama_files(llm)
    n = sum(v.numel() for k, v in sd.items() if not (cfg.tie_word_embeddings and k == "lm_head.weight"))
    rows = sd["model.embed_tokens.weight"].shape[0]
    return (f"{len(sd)} tensors match: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
            f"embedding {rows} x {cfg.hidden_size}, {n:,} parameters"), (cfg, rows)


def _vision_row(vision, heads):
    cfg, f = check_vision_files(vision, heads)
    return (f"{Path(f).name}: ViT width {cfg.width}, depth {cfg.depth}, {cfg.num_heads} heads, "
            f"patch {cfg.patch_size}, {cfg.grid}x{cfg.grid} grid"), (cfg, f)


def _projector_row(path, vis, llm):
    check_projector_file(path, vis.width, llm.hidden_size)
    return f"mm_projector {vis.width} -> {llm.hidden_size} -> {llm.hidden_size}"


def _adapter_row(llm, adapter, flags):
    own = check_adapter_files(llm, str(adapter), flags)
    targets = own.targets if isinstance(own.targets, str) else ",".join(own.targets)
    against = "matches the --lora-* flags; " if flags is not None else ""
    return f"r {own.r}, alpha {own.alpha:g}, targets {targets}: {against}tensor shapes match"


def _tokenizer_row(path, llm, rows):
    tok = load_tokenizer(path)
    return check_tokenizer(path, tok, llm, rows), tok


def check_tokenizer(path, tok, llm, rows):
    """The tokenizer's ids must index into the embedding matrix (rows): an id past its last row
    fails only when a batch first holds that token, which may be hours in. Used by the preflight,
    train.py and evaluate.py alike. -> the detail line."""
    vocab = tok.get_vocab_size()
    if vocab > rows:
        raise CheckpointError(f"{path}: vocabulary of {vocab} tokens is larger than the embedding matrix "
                              f"({rows} rows): ids {rows}..{vocab - 1} would index past it")
    ids = {"bos <s>": tok.token_to_id("<s>"), "eos </s>": tok.token_to_id("</s>"), "pad": llm.pad_token_id}
    if ids["eos </s>"] is None:
        raise CheckpointError(f"{path}: no '</s>' token (every training answer ends with it)")
    bad = [f"{name} id {i}" for name, i in ids.items() if i is not None and not 0 <= i < rows]
    if bad:
        raise CheckpointError(f"{path}: {', '.join(bad)} outside the embedding matrix ({rows} rows)")
    shown = ", ".join(f"{name} {i}" for name, i in ids.items())
    return f"vocabulary {vocab} <= embedding rows {rows}; {shown}"


def _image_size_row(vis, vision_file):
    """The processor resizes to the tower's image_size (train.py and evaluate.py build it from the
    tower's config); a config beside the weights that says otherwise means another preprocessing
    than the one the tower was trained with, or a tower whose pos_embed was resized."""
    processor = ImageProcessor(vis.image_size, vis.mean, vis.std)
    bad = {f: s for f, s in vision_image_size(vision_file).items() if s != processor.size}
    for f, s in bad.items():
        raise CheckpointError(f"{f}: image_size {s} but the tower's pos_embed holds a {vis.grid}x{vis.grid} grid "
                              f"of {vis.patch_size}-px patches ({processor.size} px)")
    return f"processor {processor.size} px = {vis.grid} x {vis.patch_size}-px patches ({vis.grid ** 2 + 1} positions)"


def preflight_model(pf, paths, vision_heads=None, lora_flags=None, tokenizer_flag="--tokenizer"):
    """Checkpoint keys and shapes, tokenizer vs embedding, image size; paths: preflight_paths'.
    lora_flags: the LoRA the run wraps the model with before loading --adapter (None: the adapter's
    own). -> (LlamaConfig, VisionConfig, tokenizer), each None when its check failed."""
    llm = vis = tok = None
    if "--llm" in paths:
        llm, rows = pf.check("llm checkpoint", lambda: _llm_row(paths["--llm"])) or (None, None)
    else:
        pf.skip("llm checkpoint", "no --llm path")
    if "--vision" in paths:
        vis, vision_file = pf.check("vision checkpoint", lambda: _vision_row(paths["--vision"], vision_heads)) \
            or (None, None)
    else:
        pf.skip("vision checkpoint", "no --vision path")
    parts = llm is not None and vis is not None
    if "--projector" in paths:
        if parts:
            pf.check("projector", lambda: _projector_row(paths["--projector"], vis, llm))
        else:
            pf.skip("projector", "needs the llm and vision checks to pass")
    if "--adapter" in paths:
        if llm is not None:
            pf.check("adapter", lambda: _adapter_row(llm, paths["--adapter"], lora_flags))
        else:
            pf.skip("adapter", "needs the llm check to pass")
    tok_path = paths.get(tokenizer_flag, paths.get("--llm"))
    if llm is not None and tok_path is not None:
        tok = pf.check("tokenizer", lambda: _tokenizer_row(tok_path, llm, rows))
    else:
        pf.skip("tokenizer", "needs the llm check to pass")
    if vis is not None:
        pf.check("image size", lambda: _image_size_row(vis, vision_file))
    else:
        pf.skip("image size", "needs the vision check to pass")
    return llm, vis, tok


def decode_images(records, path):
    """Decode every image fully, in threads (Pillow's decoders release the GIL): a truncated file
    passes a header check and fails only when a batch reaches it."""
    with ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as pool:
        errors = [e for e in pool.map(_decode_error, records) if e is not None]
    if errors:
        raise DataError(f"{path}: {errors[0]} ({len(errors)} of {len(records)} images fail to decode)")


def _decode_error(record):
    try:
        load_image(record["image"], record["id"])
    except DataError as e:
        return str(e)
    return None


def group_counts(records, dataset):
    """"race: white 12, black 8; age: ..." over the attributes the data set records."""
    parts = []
    for a in recorded_attributes(dataset):
        counts = Counter(group_names(records, a))
        parts.append(f"{a}: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    return "; ".join(parts)


def preflight_records(pf, name, path, dataset, image_root):
    """A LLaVA JSON validated in full (fields, demographics, every image decoded) -> its records."""
    def row():
        records = read_llava_json(path, dataset, image_root)
        decode_images(records, path)
        return f"{len(records)} items valid, images decoded; {group_counts(records, dataset)}", records
    return pf.check(name, row)


def preflight_out(pf, out, need_bytes=0, what=""):
    """--out writable with room for need_bytes. The only write: a temp file, created and deleted in
    --out (or in its nearest existing parent, where the run would create it)."""
    def row():
        folder = nearest_existing(out)
        if not folder.is_dir():
            raise ValueError(f"--out {out}: {folder} is a file, not a folder")
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".preflight-"):
                pass
        except OSError as e:
            raise ValueError(f"--out {out}: cannot write in {folder} ({e.strerror})") from None
        free = shutil.disk_usage(folder).free
        if need_bytes > free:
            raise ValueError(f"--out {out}: {free / GIB:.2f} GiB free in {folder}, {what} need {need_bytes / GIB:.2f} GiB")
        where = "exists" if folder == Path(out).absolute() else f"will be created in {folder}"
        room = f"; {what} need {need_bytes / GIB:.2f} GiB" if need_bytes else ""
        return f"writable ({where}); {free / GIB:.1f} GiB free{room}"
    pf.check("out folder", row)


# ----------------------------------------------------------------------------------------------
# train.py --dry-run and --preflight


def dry_run(cfg, llm_cfg=None, vision_cfg=None):
    """Print the parameter counts and a per-GPU memory estimate -> the estimate in bytes. The
    official Vicuna-7B + ViT-B/16 unless the configs of other checkpoints are given."""
    llm_cfg, vision_cfg = llm_cfg or LlamaConfig(), vision_cfg or VisionConfig()
    with torch.device("meta"):
        model = LlavaModel(llm_cfg, vision_cfg)
        apply_lora(model.llm, cfg.lora)
        fair = FairnessRegularizer(cfg.fair, llm_cfg.hidden_size)
    mark_only_lora_as_trainable(model, extra=("mm_projector",))
    lora_n = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    proj_n = sum(p.numel() for p in model.mm_projector.parameters())
    vit_n = sum(p.numel() for p in model.vision_tower.parameters())
    trainable, frozen = count_parameters(model)
    dac_n = sum(p.numel() for p in fair.parameters())
    c, B, T = model.llm.config, cfg.batch_size, cfg.max_length
    H, L, V, I = c.hidden_size, c.num_hidden_layers, c.vocab_size, c.intermediate_size
    w = 2 if cfg.dtype == "bf16" else 4
    mem = {
        "frozen weights": frozen * w,
        "trainable fp32 weights + grads + AdamW (4 copies)": (trainable + dac_n) * 4 * 4,
        # with checkpointing each layer keeps its input; one layer's activations are rebuilt in backward
        "layer inputs kept by checkpointing": L * B * T * H * w,
        "one layer recomputed (attn + SwiGLU + LoRA paths, flash attention)": B * T * (10 * H + 4 * I + 14 * cfg.lora.r) * w,
        # model.causal_lm_loss: one chunk of fp32 logits at a time (+ its bf16 copies), and the
        # supervised rows of the last hidden state with their gradient (at most all B * T)
        "LM loss: one chunk of logits, supervised rows + their gradient":
            max(1, LOSS_CHUNK_ELEMENTS // V) * V * (4 + (2 if w == 2 else 0)) + 2 * B * T * H * w,
    }
    official = (llm_cfg, vision_cfg) == (LlamaConfig(), VisionConfig())
    what = "Vicuna-7B + BiomedCLIP ViT-B/16" if official else \
        f"Llama {llm_cfg.num_hidden_layers}x{llm_cfg.hidden_size} + ViT {vision_cfg.depth}x{vision_cfg.width}"
    print(f"{what}, LoRA r={cfg.lora.r} on {','.join(t.removesuffix('_proj') for t in cfg.lora.targets)}")
    print(f"  language model   {sum(p.numel() for p in model.llm.parameters()) - lora_n:>15,}  frozen")
    print(f"  vision tower     {vit_n:>15,}  frozen")
    print(f"  LoRA             {lora_n:>15,}  trainable")
    print(f"  projector        {proj_n:>15,}  trainable")
    print(f"  DAC (phi)        {dac_n:>15,}  trainable ({', '.join(cfg.fair.attributes)})")
    print(f"  total trainable {trainable + dac_n:,} of {trainable + frozen + dac_n:,} "
          f"({100 * (trainable + dac_n) / (trainable + frozen + dac_n):.2f}%)")
    print(f"Estimated memory per GPU at batch {B} x length {T}, {cfg.dtype}, "
          f"{'with' if cfg.grad_checkpointing else 'WITHOUT'} gradient checkpointing:")
    if not cfg.grad_checkpointing:
        mem["layer inputs kept by checkpointing"] = 0
        mem["all layers' activations (no checkpointing)"] = L * B * T * (10 * H + 4 * I + 14 * cfg.lora.r) * w
    for k, v in mem.items():
        print(f"  {k:<70} {v / GIB:7.2f} GiB")
    print(f"  {'total (excluding allocator slack and CUDA context, ~1-2 GiB)':<70} {sum(mem.values()) / GIB:7.2f} GiB")
    return sum(mem.values())


# bytes per trainable parameter in checkpoint.pt: the fp32 weight and AdamW's two moments
CHECKPOINT_BYTES_PER_PARAM = 4 * 3


def check_train_run(cfg, args):
    """train.py --preflight with the run's flags: one table of checks -> exit status 0 or 2."""
    pf = Preflight()
    paths = preflight_paths(pf, {flag: (path, INPUT_KINDS[flag]) for flag, path in run_inputs(cfg).items()},
                            required=("--train-json",))
    if cfg.stage == 1 and paths.pop("--adapter", None) is not None:
        pf.skip("adapter", "stage 1 trains the projector only; --adapter is not used")
    llm, vis, tok = preflight_model(pf, paths, cfg.vision_heads or None, cfg.lora)
    if llm is not None:
        pf.check("layer of h", lambda: cfg.fair.check_layer(llm.num_hidden_layers) or
                 f"--layer {cfg.fair.layer} of {llm.num_hidden_layers} layers")
    records = _preflight_data(pf, cfg, paths, tok, args.strict_text)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    if records is not None:
        pf.check("batches per rank", lambda: _batches_row(cfg, len(records), world))
    else:
        pf.skip("batches per rank", "needs the train json to pass")
    if nearest_existing(cfg.out).is_dir():
        pf.check("out state", lambda: _out_state_row(cfg, args.overwrite))
    else:
        pf.skip("out state", "needs the out folder check to pass")
    if llm is not None and vis is not None:
        trainable = trainable_count(cfg, llm, vis)
        preflight_out(pf, cfg.out, checkpoint_bytes(trainable),
                               f"checkpoints of {trainable:,} trainable parameters")
        _preflight_gpu(pf, cfg, llm, vis)
    else:
        preflight_out(pf, cfg.out)
        pf.skip("gpu memory", "needs the llm and vision checks to pass")
    return pf.report("train.py")


def _preflight_data(pf, cfg, paths, tok, strict_text):
    """The training JSON in full (and --monitor-json), then its text as the tokenizer cuts it."""
    records = None
    if "--train-json" in paths:
        records = preflight_records(pf, "train json", cfg.train_json, cfg.dataset, cfg.image_root or None)
    if "--monitor-json" in paths:
        preflight_records(pf, "monitor json", cfg.monitor_json, cfg.dataset, cfg.image_root or None)
    if records is not None and tok is not None:
        pf.check("train text", lambda: _text_row(records, tok, cfg, strict_text))
    return records


def _text_row(records, tok, cfg, strict):
    scan = data.scan_text(records, tok, cfg.max_length)  # a DataError for an item that cannot be trained
    detail = f"{len(scan.unk)} of {scan.n} reports with <unk>, {len(scan.cut)} cut at --max-length {cfg.max_length}"
    if strict and (scan.unk or scan.cut):
        raise ValueError(f"--strict-text: {cfg.train_json}: {detail}")
    return detail


def _batches_row(cfg, n, world):
    """Each rank needs one optimizer step's worth of samples: --batch-size x --grad-accum. The
    DistributedSampler drops the tail (n // world each); resampling draws ceil(n / world)."""
    resample = cfg.method == "resample" and cfg.stage == 2
    per_rank = math.ceil(n / world) if resample else n // world
    need = cfg.batch_size * cfg.grad_accum
    if per_rank < need:
        raise ValueError(f"{cfg.train_json}: {n} samples give {per_rank} per rank on {world} rank(s), fewer than one "
                         f"step's --batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} = {need}")
    steps = per_rank // cfg.batch_size // cfg.grad_accum
    return f"{world} rank(s) x {per_rank} samples: {steps} optimizer step(s) per epoch"


def _out_state_row(cfg, overwrite):
    """check_out's verdict on --out; for --resume the checkpoint's settings are read with its
    tensors left on disk (mmap onto the meta device)."""
    if not cfg.resume:
        check_out(cfg, overwrite)
        return "fresh run: --out is empty or absent" if not overwrite else "--overwrite: train.py's old files go"
    path = Path(cfg.out) / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} not found")
    try:
        st = torch.load(path, map_location="meta", weights_only=True, mmap=True)
        old = json.loads(st["config"])
    except Exception as e:
        raise ValueError(f"--resume {path}: not a readable checkpoint written by train.py ({type(e).__name__})") from None
    check_resume_flags(old, cfg, path)
    return f"--resume from step {st['step']}: settings match"


def trainable_count(cfg, llm_cfg, vision_cfg):
    """Trainable parameters of the run (projector, + LoRA in stage 2, + phi for FairLLaVA), on meta."""
    with torch.device("meta"):
        model = LlavaModel(llm_cfg, vision_cfg)
        if cfg.stage == 2:
            apply_lora(model.llm, cfg.lora)
        fair = FairnessRegularizer(cfg.fair, llm_cfg.hidden_size) if (cfg.method == "fairllava" and cfg.stage == 2) else None
    n = sum(p.numel() for p in model.mm_projector.parameters())
    n += sum(v.numel() for v in lora_state_dict(model.llm).values())
    return n + (sum(p.numel() for p in fair.parameters()) if fair is not None else 0)


def checkpoint_bytes(trainable):
    """Disk --out needs at the peak: checkpoint.pt twice (atomic_save writes NAME.tmp beside the
    old one) plus the fp32 exports (mm_projector.bin, adapter/)."""
    return 2 * trainable * CHECKPOINT_BYTES_PER_PARAM + trainable * 4


def _preflight_gpu(pf, cfg, llm, vis):
    if not torch.cuda.is_available():
        pf.skip("gpu memory", "(no GPU)")
        return

    def row():
        with contextlib.redirect_stdout(io.StringIO()):  # the table is the output, not dry_run's lines
            need = dry_run(cfg, llm, vis)
        free, total = torch.cuda.mem_get_info(0)
        if need > free:
            raise ValueError(f"--dry-run estimates {need / GIB:.1f} GiB per GPU at --batch-size {cfg.batch_size} x "
                             f"--max-length {cfg.max_length}, {free / GIB:.1f} GiB free of {total / GIB:.1f} on "
                             f"{torch.cuda.get_device_name(0)}")
        return f"estimate {need / GIB:.1f} GiB of {free / GIB:.1f} GiB free ({torch.cuda.get_device_name(0)})"
    pf.check("gpu memory", row)
