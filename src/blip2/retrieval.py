"""Image-text retrieval over a whole gallery: ITC similarity, then ITM re-ranking of the top k (BLIP-2 paper
§4.4; LAVIS blip2_qformer.py: compute_sim_matrix).

    i2t, t2i = score_matrix(model, images, input_ids, attention_mask, k=128)
    blip2.metrics.recall_at_k(i2t, t2i, img2txt, txt2img)

The protocol (BLIP-2 / LAVIS): ITC similarity s(i, j) = max over the Q queries of the cosine similarity between
image i's projected query outputs and text j's projected [CLS] output (no temperature). For every image row the
top k texts by s, and for every text row the top k images, are re-scored as
    ITM class-1 logit (itm_head averaged over the query outputs) + s(i, j);
every other entry is -inf.

How it runs, and what it holds in memory (N images, T texts, M encoder tokens, W processes):
1. text pass: normalised text embeddings [T, D] (every process computes all of them: < 1% of the work);
2. image pass 1: encoder features per image batch -> normalised query embeddings [N, Q, D]; process r takes
   image batches r, r+W, r+2W, ... and the embeddings are summed across processes;
3. ITC matrix [N, T] in fp32, computed in row blocks so the [rows, Q, T] intermediate stays under 256 MB;
   top k per image row and per text row (identical on every process);
4. image pass 2: for each of this process's image batches, the union of its (image, text) pairs from both
   directions is scored once by ITM, in batches of `batch_size` pairs grouped by image (a pair in both top-k
   lists is computed once); the features come from the batch's own encoder pass;
5. the [N, T] and [T, N] results (-inf where not scored) are all-reduced with MAX, so every process returns
   the full matrices (each entry is scored by exactly one process).
The encoder features [N, M, Dv] are never held for the whole gallery (ViT-g, 224 px, 5k images: 7 GB fp32):
by default pass 2 recomputes them per batch, which costs one extra encoder pass (about 5% of the work at k=128:
~0.5 TFLOP per ViT-g image against ~13 GFLOP per ITM pair and (N+T)*k pairs). `cache_image_features=True`
keeps this process's features from pass 1 in the model dtype instead (fp16: 0.72 MB per ViT-g image).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from tqdm.auto import tqdm

from . import dist, heads
from .losses import itc_similarity

_ITC_BLOCK_ELEMENTS = 2**26  # fp32 elements of one [rows, Q, T] block of the ITC computation (256 MB)


# ----------------------------------------------------------------------------------------- processes
def _check_same_sizes(n_img: int, n_txt: int, device) -> None:
    """Every process must see the same gallery (same image batches in the same order, same texts)."""
    if dist.world_size() == 1:
        return
    sizes = torch.tensor([n_img, -n_img, n_txt, -n_txt], device=device)
    got = dist.all_reduce_(sizes.clone(), "max")
    if not torch.equal(got, sizes):
        raise ValueError(f"score_matrix: processes disagree on the gallery size (this one has {n_img} images, "
                         f"{n_txt} texts). Give every process the whole gallery in the same order (no "
                         f"DistributedSampler, no shuffling); the work is split by score_matrix itself")


# ------------------------------------------------------------------------------------------- images
def _pixels_of(batch) -> torch.Tensor:
    """A batch from a loader: a [B, 3, H, W] tensor, a mapping with "pixel_values", or a tuple led by the tensor."""
    if isinstance(batch, Mapping):
        batch = batch.get("pixel_values")
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
        raise TypeError(f"an image batch must be a [B, 3, H, W] tensor, a dict with 'pixel_values' or a tuple "
                        f"whose first item is that tensor; got {type(batch).__name__}"
                        + (f" of shape {list(batch.shape)}" if isinstance(batch, torch.Tensor) else ""))
    return batch


class _Images:
    """The gallery as a source of image batches that can be walked twice (passes 1 and 2).

    Accepts a [N, 3, H, W] tensor (split into `batch_size` rows), a re-iterable of batches (list, DataLoader),
    or a zero-argument callable returning a fresh iterable of batches. A one-shot iterator (a generator) can be
    walked only once, so it needs cache_image_features=True."""

    def __init__(self, source, batch_size: int):
        self.one_shot = False
        if isinstance(source, torch.Tensor):
            if source.ndim != 4:
                raise ValueError(f"pixel_values must be [N, 3, H, W], got {list(source.shape)}")
            self._make: Callable[[], Iterable] = lambda: source.split(batch_size)
            self.num_batches = -(-source.shape[0] // batch_size)
        elif callable(source):
            self._make, self.num_batches = source, None
        elif isinstance(source, Iterable):
            self.one_shot = iter(source) is source
            self._make = lambda: source
            self.num_batches = len(source) if hasattr(source, "__len__") else None
        else:
            raise TypeError(f"pixel_values must be a tensor, an iterable of batches or a callable returning one; "
                            f"got {type(source).__name__}")

    def walk(self, rank: int, world: int) -> Iterator[tuple[int, int, torch.Tensor | None]]:
        """(global index of the batch's first image, batch size, pixels) for every batch; the pixels are None for
        batches another process handles (batch b belongs to process b % world)."""
        offset = 0
        for b, batch in enumerate(self._make()):
            x = _pixels_of(batch)
            yield offset, x.shape[0], (x if b % world == rank else None)
            offset += x.shape[0]


# ------------------------------------------------------------------------------------------ model parts
def _query_embeds(model, feats: torch.Tensor) -> torch.Tensor:
    """Encoder features [B, M, Dv] -> normalised ITC query embeddings [B, Q, D] in fp32."""
    q = model.qformer(feats).query_output  # (B, Q, H): queries-only pass
    return heads.project_image(model.vision_proj, q, fp32=True)


def _text_embeds(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Normalised ITC text embeddings [B, D] in fp32 (text-only pass, [CLS] output)."""
    out = model.qformer(None, input_ids=input_ids, text_mask=attention_mask, mode="itc", with_queries=False)
    return heads.project_text(model.text_proj, out.text_output, fp32=True)  # from [CLS]


def _trim_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing columns that are padding in every row (exact: masked keys carry no weight and the positions
    of the remaining tokens do not change). A gallery padded to its longest caption gets shorter ITM batches."""
    real = mask.bool().any(dim=0).nonzero()
    end = int(real.max()) + 1 if real.numel() else 1
    return ids[:, :end], mask[:, :end]


def _itm_class1(model, feats: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """ITM class-1 logit [B] for pairs row by row: feats [B, M, Dv], text [B, L]; itm_head averaged over queries."""
    ids, mask = _trim_padding(input_ids, attention_mask)
    q = model.qformer(feats, input_ids=ids, text_mask=mask, mode="itm").query_output  # (B, Q, H)
    return heads.itm_logits(model.itm_head, q, fp32=True)[:, 1]  # (B, 2) -> (B,)


def _itc_matrix(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """Max-over-queries cosine similarity [N, T] from img [N, Q, D] and txt [T, D], in row blocks."""
    N, Q, _ = img.shape
    T = txt.shape[0]
    out = torch.empty(N, T, device=img.device)
    rows = max(1, _ITC_BLOCK_ELEMENTS // max(1, Q * T))
    for s in range(0, N, rows):
        out[s:s + rows] = itc_similarity(img[s:s + rows], txt)  # (rows, T)
    return out


# --------------------------------------------------------------------------------------------- public
@torch.no_grad()
def score_matrix(model, pixel_values, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 k: int = 128, batch_size: int = 64, progress: bool = True,
                 cache_image_features: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Retrieval scores (i2t [N_img, N_txt], t2i [N_txt, N_img]), fp32 on the CPU: ITM class-1 logit + ITC
    similarity for each row's top k candidates by ITC, -inf elsewhere (k >= the number of candidates scores all).

    model: a Blip2Model with stage-1 heads (a Blip2ForImageTextRetrieval or stage-1 checkpoint).
    pixel_values: the images, pre-processed: a [N_img, 3, H, W] tensor, a re-iterable of batches (a list, a
        DataLoader; a batch is a tensor, a dict with "pixel_values" or a tuple led by the tensor) or a
        zero-argument callable that returns a fresh iterable of batches. It is walked twice (see the module
        docstring) unless cache_image_features=True.
    input_ids / attention_mask: the tokenized captions [N_txt, L] (Q-Former tokenizer, padded on the right: the
        text embedding is the [CLS] output at position 0).
    batch_size: images per encoder batch (for a tensor), texts per text batch, and pairs per ITM batch.
    Under torch.distributed every process passes the whole gallery; the work is split across processes and every
    process gets the full matrices.
    """
    attention_mask = _checked_mask(model, input_ids, attention_mask, k, batch_size)
    images = _Images(pixel_values, batch_size)
    if images.one_shot and not cache_image_features:
        raise ValueError("pixel_values is a one-shot iterator but the gallery is walked twice: pass a list, a "
                         "DataLoader or a callable returning a fresh iterable, or set cache_image_features=True")
    rank, world = dist.rank(), dist.world_size()
    device = model.device
    quiet = not progress or rank != 0
    was_training = model.training
    model.eval()
    try:
        ids, mask = input_ids.to(device), attention_mask.to(device)
        # 1. text embeddings [T, D], all on every process
        txt = torch.cat([_text_embeds(model, ids[s:s + batch_size], mask[s:s + batch_size])
                         for s in tqdm(range(0, ids.shape[0], batch_size), desc="retrieval: texts", disable=quiet)])
        # 2. image pass 1: query embeddings [N, Q, D] everywhere; this process's batches (features if cached)
        img, own = _gallery_query_embeds(model, images, txt, cache_image_features, quiet)
        # 3. ITC and the candidates of every row
        itc = _itc_matrix(img, txt)  # (N, T)
        plan = _pair_plan(itc, k, own)
        # 4. image pass 2: ITM for the union of pairs of each own batch, features recomputed (or cached)
        if cache_image_features:
            batches = ((offset, n, feats) for offset, n, feats in own)
        else:
            batches = ((offset, n, model.encode_image(x.to(device))) for offset, n, x in images.walk(rank, world)
                       if x is not None)
        i2t, t2i = _rerank(model, batches, plan, itc, ids, mask, batch_size, quiet)
        # 5. every entry was scored by one process: MAX gives all processes the full matrices
        dist.all_reduce_(i2t, "max")
        dist.all_reduce_(t2i, "max")
        return i2t.cpu(), t2i.cpu()
    finally:
        model.train(was_training)


def _checked_mask(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, k: int,
                  batch_size: int) -> torch.Tensor:
    """score_matrix's arguments checked; the attention mask (all ones when not given)."""
    if not getattr(model.cfg, "stage1_heads", False):
        raise ValueError("score_matrix needs a model with stage-1 heads (vision_proj, text_proj, itm_head): load a "
                         "Blip2ForImageTextRetrieval or stage-1 checkpoint")
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be >= 1, got k={k}, batch_size={batch_size}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [N_txt, L], got {list(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {list(attention_mask.shape)} must match input_ids {list(input_ids.shape)}")
    if input_ids.shape[1] and not bool(attention_mask[:, 0].all()):
        raise ValueError("score_matrix: the captions are padded on the left (attention_mask[:, 0] has zeros); pad "
                         "them on the right (tokenizer.padding_side = 'right') so that [CLS] is at position 0")
    return attention_mask


def _gallery_query_embeds(model, images: _Images, txt: torch.Tensor, cache_image_features: bool, quiet: bool):
    """(query embeddings [N, Q, D] of the whole gallery on every process, this process's batches as
    (offset, size, encoder features if cached else None))."""
    rank, world, device = dist.rank(), dist.world_size(), model.device
    own: list[tuple[int, int, torch.Tensor | None]] = []
    embeds: list[tuple[int, torch.Tensor]] = []
    n_img = 0
    for offset, n, x in tqdm(images.walk(rank, world), total=images.num_batches,
                             desc="retrieval: images", disable=quiet):
        n_img = offset + n
        if x is None:
            continue
        feats = model.encode_image(x.to(device))  # (n, M, Dv) in the model dtype
        embeds.append((offset, _query_embeds(model, feats)))
        own.append((offset, n, feats if cache_image_features else None))
    n_txt = txt.shape[0]
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"score_matrix needs at least one image and one text, got {n_img} and {n_txt}")
    _check_same_sizes(n_img, n_txt, device)
    img = torch.zeros(n_img, model.num_query_tokens, txt.shape[1], device=device)
    for offset, e in embeds:
        img[offset:offset + e.shape[0]] = e
    dist.all_reduce_(img, "sum")  # each row is non-zero on exactly one process
    return img, own


def _pair_plan(itc: torch.Tensor, k: int, own: list) -> dict:
    """{(offset, size): (i2t codes, t2i codes, their union, inverse)} for each own image batch: the pairs to score
    with ITM, coded local_image * T + text (the union sorted, so grouped by image)."""
    n_img, n_txt = itc.shape
    device = itc.device
    top_txt = itc.topk(min(k, n_txt), dim=1).indices  # (N, k): candidate texts of each image
    top_img = itc.t().topk(min(k, n_img), dim=1).indices  # (T, k): candidate images of each text
    # the text->image pairs sorted by image, so each image batch finds its pairs with a binary search
    t2i_img, order = top_img.flatten().sort(stable=True)
    t2i_txt = torch.arange(n_txt, device=device).repeat_interleave(top_img.shape[1])[order]

    def pairs(offset: int, n: int):
        rows = top_txt[offset:offset + n]  # (n, k)
        a = torch.arange(n, device=device).repeat_interleave(rows.shape[1]) * n_txt + rows.flatten()
        lo, hi = torch.searchsorted(t2i_img, torch.tensor([offset, offset + n], device=device)).tolist()
        b = (t2i_img[lo:hi] - offset) * n_txt + t2i_txt[lo:hi]
        union, inverse = torch.cat([a, b]).unique(return_inverse=True)  # sorted: grouped by image
        return a, b, union, inverse

    return {(offset, n): pairs(offset, n) for offset, n, _ in own}


def _rerank(model, batches, plan: dict, itc: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, batch_size: int,
            quiet: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t [N, T], t2i [T, N]): ITM class-1 logit + ITC for the planned pairs of each (offset, size, features)
    batch, -inf elsewhere."""
    n_img, n_txt = itc.shape
    device = itc.device
    i2t = torch.full((n_img, n_txt), -torch.inf, device=device)
    t2i = torch.full((n_txt, n_img), -torch.inf, device=device)
    bar = tqdm(total=sum(p[2].numel() for p in plan.values()), desc="retrieval: ITM pairs", disable=quiet)
    for offset, n, feats in batches:
        if (offset, n) not in plan:
            raise ValueError("pixel_values gave different batches on its second walk; it must yield the same "
                             "images in the same order every time (no shuffling), or use cache_image_features")
        a, b, union, inverse = plan[(offset, n)]
        scores = torch.empty(union.numel(), device=device)
        for s in range(0, union.numel(), batch_size):
            codes = union[s:s + batch_size]
            img_local, txt_idx = codes // n_txt, codes % n_txt
            scores[s:s + batch_size] = _itm_class1(model, feats[img_local], ids[txt_idx], mask[txt_idx])
            bar.update(codes.numel())
        gi, tj = a // n_txt + offset, a % n_txt  # image->text pairs (global image, text)
        i2t[gi, tj] = scores[inverse[:a.numel()]] + itc[gi, tj]
        gi, tj = b // n_txt + offset, b % n_txt  # text->image pairs
        t2i[tj, gi] = scores[inverse[a.numel():]] + itc[gi, tj]
    bar.close()
    return i2t, t2i
