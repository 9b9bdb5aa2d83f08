"""Near-duplicate candidates and their geometric verification (no learned weights).

Candidates, at most a few partners per image, so the work is linear in N:
- multi-crop pHash: an image's full-frame code against the 6 crop/mirror codes of the others;
- ORB voting: the strongest descriptors of every image in one binary index (FAISS when importable, else
  numpy); each query descriptor (plain and mirrored) votes for the images within a Hamming band of its best
  match, so a photo with several copies votes for all of them (Lowe's ratio test would drop those votes).
Verification of a pair: ORB matches (also against the mirror), RANSAC homography with sanity bounds, then the
tile-median normalised cross-correlation of the warped overlap. Inliers alone are not enough: two different
photos under the same caption bar share 100+ inliers on the text, and the correlation of the photo tiles
rejects them. The same picture must fill most of the overlap (``MIN_AGREE`` of its textured tiles correlate): a
crop lies wholly inside its original and passes; two collages that share one photo among others do not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .dedupe import popcount64
from .features import Features

MULTICROP_MAX = 12
SAME_FULL = 4  # full-frame codes this close: a direct pHash accept, no multi-crop partner slot
TOP_PARTNERS = 5
TOP_VOTE_PARTNERS = 8  # a photo with many copies needs more than 5
MIN_VOTES = 6
VOTE_OVER_BACKGROUND = 4.0
VOTE_BAND = 8  # a query votes for images within best + band bits
VOTE_MAX_DIST = 64
VOTE_K = 16
MIN_INLIERS = 10
MIN_NCC = 0.5
MIN_COVER = 0.6  # the overlap must cover most of at least one of the two frames
# and the same picture must fill most of the overlap: at least this share of its textured tiles correlate
# (NCC >= min_ncc). Two collages that share one photo among others correlate on that photo's tiles only.
MIN_AGREE = 0.6
GRID = 8
RATIO = 0.85


# -- candidates ---------------------------------------------------------------------------------------
def multicrop_candidates(codes: np.ndarray, max_dist: int = MULTICROP_MAX, top: int = TOP_PARTNERS):
    """Pairs (i, j, distance): i's full-frame pHash within ``max_dist`` of one of j's 8 crop/mirror/band-stripped codes."""
    n = len(codes)
    out: dict[tuple[int, int], int] = {}
    if n < 2:
        return out
    full = codes[:, 0].copy()
    block = max(1, 2_000_000 // (6 * n))
    for s in range(0, n, block):
        q = full[s : s + block]
        d = popcount64(q[:, None, None] ^ codes[None, :, :]).min(axis=2).astype(np.int16)
        rows = np.arange(len(q))
        d[rows, s + rows] = 99  # not itself
        # near-identical full frames are accepted by the global pHash already: they must not take the
        # partner slots (a photo with many resized/recoloured copies would crowd its meme or crop out)
        d[popcount64(q[:, None] ^ full[None, :]) <= SAME_FULL] = 99
        k = min(top, n - 1)
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        for r in rows:
            for j in part[r]:
                dist = int(d[r, j])
                if dist <= max_dist:
                    i = s + int(r)
                    key = (i, int(j)) if i < j else (int(j), i)
                    out[key] = min(dist, out.get(key, 99))
    return out


def _hamming_knn_numpy(db: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest binary descriptors (uint8 rows of 32) by brute force, in blocks."""
    dbw = np.ascontiguousarray(db).view(np.uint64)  # (m, 4)
    qw = np.ascontiguousarray(queries).view(np.uint64)
    k = min(k, len(db))
    dist_out = np.empty((len(queries), k), np.int32)
    lab_out = np.empty((len(queries), k), np.int64)
    block = max(1, 4_000_000 // max(1, len(db)))
    for s in range(0, len(queries), block):
        q = qw[s : s + block]
        d = np.zeros((len(q), len(db)), np.int32)
        for w in range(4):
            d += popcount64(q[:, w, None] ^ dbw[None, :, w])
        idx = np.argpartition(d, k - 1, axis=1)[:, :k]
        dd = np.take_along_axis(d, idx, axis=1)
        order = np.argsort(dd, axis=1, kind="stable")
        dist_out[s : s + len(q)] = np.take_along_axis(dd, order, 1)
        lab_out[s : s + len(q)] = np.take_along_axis(idx, order, 1)
    return dist_out, lab_out


FLAT_MAX = 50_000  # descriptors: up to here an exact flat index (about 500 images; its cost grows with N)
IVF_LIST = 512  # descriptors per inverted list on average: fixed, so a query's cost does not grow with N
IVF_NPROBE = 8


class BinaryIndex:
    """Hamming k-NN over 256-bit descriptors: FAISS (flat, or IVF for large sets) or a numpy fallback.

    The IVF keeps the lists at a fixed mean size (nlist grows with the descriptors) and finds a query's
    lists through an HNSW graph over the centroids, so a query's list scan does not grow with N (an IVF
    with nlist ~ sqrt(m) and a flat coarse quantizer costs ~sqrt(m) per query). The k-means is trained on
    8 points per centroid in 8 iterations, to keep its cost small next to the search. Measured
    (bench/results/dedupe_scale_5k.json, CPU of the whole vote search): 41 s at 5k images, 83 s at 10k,
    207 s at 20k (a busier machine); the exact flat index took 104 s at 2k.
    """

    def __init__(self, db: np.ndarray, *, flat_max: int = FLAT_MAX, list_size: int = IVF_LIST):
        self.db = np.ascontiguousarray(db, np.uint8)
        self.kind = "numpy"
        self.index = None
        try:
            import faiss
        except ImportError:
            return
        faiss.omp_set_num_threads(1)  # small batches: threads only contend
        m = len(self.db)
        if m > flat_max:
            nlist = max(16, m // list_size)
            rng = np.random.default_rng(0)
            trainer = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(256), 256, nlist)
            trainer.cp.niter = 8
            trainer.cp.min_points_per_centroid = 1  # 8 per centroid is enough here (and no warning)
            trainer.train(self.db[rng.choice(m, min(m, 8 * nlist), replace=False)])
            quant = faiss.IndexBinaryHNSW(256, 16)
            quant.hnsw.efSearch = 32
            quant.add(trainer.quantizer.reconstruct_n(0, nlist))
            index = faiss.IndexBinaryIVF(quant, 256, nlist)
            index.train(self.db[:1])  # the quantizer holds the nlist centroids: nothing to train
            index.add(self.db)
            index.nprobe = IVF_NPROBE
            self._quantizer = quant  # the IVF does not own it
            self.kind = f"faiss-ivf{nlist}-hnsw"
        else:
            index = faiss.IndexBinaryFlat(256)
            index.add(self.db)
            self.kind = "faiss-flat"
        self.index = index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, np.uint8)
        if self.index is None:
            return _hamming_knn_numpy(self.db, queries, k)
        d, lab = self.index.search(queries, k)
        return d.astype(np.int32), lab.astype(np.int64)


def vote_candidates(
    descs: list[np.ndarray],
    mdescs: list[np.ndarray],
    progress: Callable[[int, int], None] | None = None,
    *,
    flat_max: int = FLAT_MAX,
) -> tuple[dict[tuple[int, int], int], str]:
    """Pairs (i, j) -> votes from ORB descriptor voting; and the index kind used."""
    n = len(descs)
    owner = np.concatenate(
        [np.full(len(d), i, np.int64) for i, d in enumerate(descs)] or [np.zeros(0, np.int64)]
    )
    if n < 2 or len(owner) == 0:
        return {}, "none"
    index = BinaryIndex(np.concatenate(descs), flat_max=flat_max)
    k = min(VOTE_K, len(owner))
    out: dict[tuple[int, int], int] = {}
    step = 64
    for s in range(0, n, step):
        ids = range(s, min(n, s + step))
        qs = [np.concatenate([descs[i], mdescs[i]]) for i in ids]
        qown = np.concatenate([np.full(len(q), i, np.int64) for i, q in zip(ids, qs, strict=True)])
        if len(qown) == 0:
            continue
        dist, lab = index.search(np.concatenate(qs), k)
        valid = lab >= 0
        own = np.where(valid, owner[np.clip(lab, 0, None)], -1)
        dist = np.where(valid & (own != qown[:, None]), dist, 10_000)
        best = dist.min(axis=1, keepdims=True)
        ok = (dist <= np.minimum(best + VOTE_BAND, VOTE_MAX_DIST)) & (dist < 10_000)
        rows, cols = np.nonzero(ok)
        # one vote per query descriptor and image
        key = np.unique(rows * n + own[rows, cols])
        qimg, img = qown[key // n], key % n
        pair_key, votes = np.unique(qimg * n + img, return_counts=True)
        a, b = pair_key // n, pair_key % n
        for i in ids:
            sel = np.flatnonzero(a == i)
            if not len(sel):
                continue
            # Votes must stand out of the image's background: the median votes of the images ranked beyond
            # twice the partner limit (a photo with many real copies has few such images: no floor then).
            ranked = np.sort(votes[sel])[::-1]
            tail = ranked[2 * TOP_VOTE_PARTNERS :]
            background = float(np.median(tail)) if len(tail) >= 8 else 0.0
            floor = max(MIN_VOTES, VOTE_OVER_BACKGROUND * background)
            sel = sel[np.argsort(-votes[sel], kind="stable")[:TOP_VOTE_PARTNERS]]
            for t in sel:
                if votes[t] >= floor:
                    j = int(b[t])
                    key2 = (i, j) if i < j else (j, i)
                    out[key2] = max(out.get(key2, 0), int(votes[t]))
        if progress:
            progress(min(n, s + step), n)
    return out, index.kind


# -- verification ---------------------------------------------------------------------------------------
@dataclass
class Verdict:
    ok: bool
    inliers: int = 0
    ncc: float = 0.0
    mirror: bool = False
    cover_a: float = 0.0  # fraction of a's frame that b's content covers
    cover_b: float = 0.0
    why: str = ""
    pad_a: float = 0.0  # share of a's frame outside the overlap that is flat (padding, bar): not in b
    pad_b: float = 0.0
    extra_a: float = 0.0  # share of a's frame outside the overlap with real content (b is a crop of a)
    extra_b: float = 0.0
    overlay_a: int = 0  # overlap tiles that differ and carry more edges in a (text or logo drawn on a)
    overlay_b: int = 0
    sharp: float = 1.0  # median over overlap tiles of a's / b's Laplacian energy, at equal scale
    hscale: float = 1.0  # linear scale of the homography (b's grey copy -> a's)

    def evidence(self) -> dict:
        out = {"inliers": self.inliers, "ncc": round(self.ncc, 3), "mirror": self.mirror}
        for k in ("cover_a", "cover_b", "pad_a", "pad_b", "extra_a", "extra_b"):
            out[k] = round(getattr(self, k), 3)
        out["overlay_a"], out["overlay_b"] = self.overlay_a, self.overlay_b
        out["sharp"] = round(self.sharp, 3)
        out["hscale"] = round(self.hscale, 4)
        return out


def _sane(h: np.ndarray) -> str:
    """'' when the homography is a plausible re-framing of one photo, else why not."""
    if not np.all(np.isfinite(h)) or abs(h[2, 2]) < 1e-9:
        return "degenerate homography"
    h = h / h[2, 2]
    det = float(np.linalg.det(h[:2, :2]))
    if not 0.04 < det < 25:
        return f"scale out of range (det {det:.3g})"
    if abs(h[2, 0]) > 0.004 or abs(h[2, 1]) > 0.004:
        return "extreme perspective"
    s = np.linalg.svd(h[:2, :2], compute_uv=False)
    if s[0] / max(s[1], 1e-9) > 4:
        return "extreme shear"
    return ""


def _outside(thumb: np.ndarray, covered: np.ndarray) -> tuple[float, float]:
    """(padding, extra content): shares of the frame outside the overlap that are fill / real content.

    Fill is one flat value over most of the outside area that is rare inside the overlap (a black
    letterbox around a photo); a dark sky or space that the photo itself is full of is content.
    """
    out = ~covered
    share = float(out.mean())
    if share < 0.02:
        return 0.0, 0.0
    outside = thumb[out]
    hist = np.bincount(outside.astype(np.uint8).ravel(), minlength=256)
    mode = int(np.argmax(hist))
    fill = float(hist[max(0, mode - 4) : mode + 5].sum() / outside.size)
    inside = thumb[covered]
    same = float(np.mean(np.abs(inside.astype(np.int16) - mode) <= 4)) if inside.size else 0.0
    return (share, 0.0) if fill >= 0.6 and same <= 0.25 else (0.0, share)


def tile_ncc(
    a: np.ndarray,
    b_warped: np.ndarray,
    mask: np.ndarray,
    overlay: list[int] | None = None,
    sharp: list[float] | None = None,
    tiles: list[float] | None = None,
) -> float:
    """Median normalised cross-correlation over the grid tiles that lie inside the overlap and have texture.

    ``overlay`` (if given) receives [tiles where a has extra edges, tiles where b has]: content drawn on one.
    ``tiles`` (if given) receives every measured tile's NCC (none when too few tiles have texture).
    Per tile, OpenCV's masked mean/std, histogram and mean (a few C calls instead of ~20 numpy ones).
    """
    import cv2

    h, w = a.shape
    a = np.ascontiguousarray(a, np.float32)
    b_warped = np.ascontiguousarray(b_warped, np.float32)
    mu = mask.astype(np.uint8)
    au8, bu8 = a.astype(np.uint8), b_warped.astype(np.uint8)
    vals = []
    ys = np.linspace(0, h, GRID + 1).astype(int).tolist()
    xs = np.linspace(0, w, GRID + 1).astype(int).tolist()
    for y0, y1 in zip(ys[:-1], ys[1:], strict=True):
        for x0, x1 in zip(xs[:-1], xs[1:], strict=True):
            m = mu[y0:y1, x0:x1]
            size = m.size
            if size == 0:
                continue
            inside = cv2.countNonZero(m)
            if inside / size < 0.9:
                continue
            whole = inside == size
            mm = None if whole else m
            ta, tb = a[y0:y1, x0:x1], b_warped[y0:y1, x0:x1]
            ma, sa = cv2.meanStdDev(ta, mask=mm)
            mb, sb = cv2.meanStdDev(tb, mask=mm)
            ma, sa, mb, sb = ma[0, 0], sa[0, 0], mb[0, 0], sb[0, 0]
            if sa < 2.0 and sb < 2.0:
                continue
            if (
                _fill_share_cv(au8[y0:y1, x0:x1], mm, inside) >= 0.6
                or _fill_share_cv(bu8[y0:y1, x0:x1], mm, inside) >= 0.6
            ):
                continue  # flat fill (a caption bar, a wall): it would correlate between any two memes
            ncc = (
                (cv2.mean(cv2.multiply(ta, tb), mask=mm)[0] - ma * mb) / (sa * sb)
                if min(sa, sb) >= 2
                else 0.0
            )
            vals.append(ncc)
            if whole and ((sharp is not None and ncc >= 0.5) or (overlay is not None and ncc < 0.85)):
                ea, eb = _edges_cv(ta), _edges_cv(tb)
                if sharp is not None and ncc >= 0.5:
                    sharp.append(ea / max(eb, 1e-6))
                if overlay is not None and ncc < 0.85:
                    if ea > 1.6 * eb:
                        overlay[0] += 1
                    elif eb > 1.6 * ea:
                        overlay[1] += 1
    if len(vals) < 3:
        # too few textured tiles: correlate the whole overlap instead
        if mask.sum() < 100:
            return 0.0
        ta, tb = a[mask], b_warped[mask]
        sa, sb = ta.std(), tb.std()
        if sa < 1.0 or sb < 1.0:
            return 1.0 if abs(float(ta.mean()) - float(tb.mean())) < 8 else 0.0
        return float(np.mean((ta - ta.mean()) * (tb - tb.mean())) / (sa * sb))
    if tiles is not None:
        tiles.extend(vals)
    return float(np.median(vals))


def _fill_share_cv(t: np.ndarray, mm: np.ndarray | None, inside: int) -> float:
    """Share of a uint8 tile's pixels (under the mask ``mm``; None: all ``inside`` of them) within +-4 grey
    levels of the most common value: high for padding and caption bars, low for real scenes (skies and walls
    are gradients)."""
    import cv2

    hist = cv2.calcHist([t], [0], mm, [256], [0, 256]).ravel()
    mode = int(np.argmax(hist))
    return float(hist[max(0, mode - 4) : mode + 5].sum() / inside)


def _edges_cv(t: np.ndarray) -> float:
    """Edge energy of a float32 tile: mean absolute step down plus mean absolute step across."""
    import cv2

    return cv2.mean(cv2.absdiff(t[1:], t[:-1]))[0] + cv2.mean(cv2.absdiff(t[:, 1:], t[:, :-1]))[0]


def _outside_bands(kp: np.ndarray, shape: tuple[int, int], b: list[float] | None, mirror: bool) -> np.ndarray:
    """Mask of keypoints outside the image's flat edge bands (caption bars, letterbox)."""
    if not b or not any(b) or len(kp) == 0:
        return np.ones(len(kp), bool)
    h, w = shape
    top, right, bottom, left = b
    if mirror:
        left, right = right, left
    x, y = kp[:, 0], kp[:, 1]
    return (y >= top * h) & (y <= h - bottom * h) & (x >= left * w) & (x <= w - right * w)


LOW_TEXTURE_KP = 40  # fewer ORB keypoints than this: too smooth for RANSAC, compare whole frames instead
LOW_TEXTURE_NCC = 0.95


def _whole_frame(fa: Features, fb: Features) -> Verdict:
    """Low-texture images: NCC of the whole frames at one size, plain and mirrored (resize, recompress,
    colour change and mirror are checked; crops of a smooth image cannot be told from another smooth image)."""
    import cv2

    ha, wa = fa.thumb.shape
    hb, wb = fb.thumb.shape
    if abs(np.log((wa / ha) / (wb / hb))) > 0.05:
        return Verdict(False, why="low texture and different aspect ratio")
    a = cv2.resize(fa.thumb.astype(np.float32), (64, 64), interpolation=cv2.INTER_AREA)
    b = cv2.resize(fb.thumb.astype(np.float32), (64, 64), interpolation=cv2.INTER_AREA)
    best = Verdict(False, why="low texture, frames differ")
    for mirror in (False, True):
        bb = b[:, ::-1] if mirror else b
        sa, sb = a.std(), bb.std()
        if sa < 1 or sb < 1:
            ncc = 1.0 if abs(float(a.mean()) - float(bb.mean())) < 8 else 0.0
        else:
            ncc = float(np.mean((a - a.mean()) * (bb - bb.mean())) / (sa * sb))
        if ncc > best.ncc:
            best = Verdict(ncc >= LOW_TEXTURE_NCC, 0, ncc, mirror, 1.0, 1.0)
            best.why = "" if best.ok else f"low texture, whole-frame NCC {ncc:.2f}"
    return best


def _similarity(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """RANSAC similarity (rotation, uniform scale, shift) as a 3x3 matrix, with its inlier mask."""
    import cv2

    m, inl = cv2.estimateAffinePartial2D(
        src, dst, method=cv2.RANSAC, ransacReprojThreshold=5.0, maxIters=2000
    )
    if m is None:
        return None, None
    return np.vstack([m, [0.0, 0.0, 1.0]]), inl


def _sift(f: Features) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """SIFT keypoints and descriptors of the stored grey copy and its mirror (computed once per object)."""
    import cv2

    got = getattr(f, "_sift", None)
    if got is None:
        sift = cv2.SIFT_create(nfeatures=N_SIFT)
        got = []
        for t in (f.thumb, np.ascontiguousarray(f.thumb[:, ::-1])):
            kps, desc = sift.detectAndCompute(t, None)
            kp = np.array([k.pt for k in kps], np.float32).reshape(-1, 2)
            got += [kp, desc if desc is not None else np.zeros((0, 128), np.float32)]
        f._sift = got
    return tuple(got)


N_SIFT = 500


def verify(
    fa: Features,
    fb: Features,
    min_inliers: int = MIN_INLIERS,
    min_ncc: float = MIN_NCC,
    thorough: bool = False,
) -> Verdict:
    """Is b a re-framing (crop, pad, mirror, rotation, perspective, overlay) of the same photo as a?
    ``thorough``: match SIFT descriptors (computed here from the stored grey copies) instead of ORB."""
    import cv2

    if min(len(fa.kp), len(fb.kp)) < LOW_TEXTURE_KP:
        return _whole_frame(fa, fb)

    cv2.setNumThreads(1)  # many small calls: threads only contend on a shared machine
    best = Verdict(False, why="too few matching keypoints")
    if thorough:
        a_kp, a_desc, _, _ = _sift(fa)
        b_kp, b_desc, b_mkp, b_mdesc = _sift(fb)
        norm, max_dist = cv2.NORM_L2, np.inf
    else:
        a_kp, a_desc, b_kp, b_desc, b_mkp, b_mdesc = fa.kp, fa.desc, fb.kp, fb.desc, fb.mkp, fb.mdesc
        norm, max_dist = cv2.NORM_HAMMING, 64
    keep_a = _outside_bands(a_kp, fa.thumb.shape, fa.signals.get("bands"), False)
    kpa, da = a_kp[keep_a], a_desc[keep_a]
    for mirror in (False, True):
        if best.ok and best.ncc >= 0.8:
            break
        kpb, db = (b_mkp, b_mdesc) if mirror else (b_kp, b_desc)
        keep_b = _outside_bands(kpb, fb.thumb.shape, fb.signals.get("bands"), mirror)
        kpb, db = kpb[keep_b], db[keep_b]
        if len(da) < 4 or len(db) < 4:
            continue
        pairs = cv2.BFMatcher(norm).knnMatch(da, db, k=2)
        # ratio test per pair (the index voting above deliberately does without it)
        matches = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
        matches = [m for m in matches if m.distance <= max_dist]
        if len(matches) < min_inliers:
            if not best.inliers:
                best = Verdict(False, why=f"{len(matches)} keypoint matches")
            continue
        src = kpb[[m.trainIdx for m in matches]]
        dst = kpa[[m.queryIdx for m in matches]]
        h, inl = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, 5.0, maxIters=2000, confidence=0.995)
        if h is None or int(inl.sum()) < min_inliers or _sane(h):
            # Smooth photos (moon, sky) give a degenerate homography from few spread matches; scraper
            # crops are a similarity (scale, shift, small rotation), which 2 matches determine.
            h2, inl2 = _similarity(src, dst)
            if h2 is not None and int(inl2.sum()) >= min_inliers and not _sane(h2):
                h, inl = h2, inl2
        if h is None:
            continue
        n_in = int(inl.sum())
        if n_in < min_inliers:
            if n_in > best.inliers and not best.ok:
                best = Verdict(False, n_in, mirror=mirror, why=f"{n_in} RANSAC inliers")
            continue
        bad = _sane(h)
        if bad:
            if not best.ok and n_in >= best.inliers:
                best = Verdict(False, n_in, mirror=mirror, why=bad)
            continue
        thumb_b = np.ascontiguousarray(fb.thumb[:, ::-1]) if mirror else fb.thumb
        ha, wa = fa.thumb.shape
        hb, wb = thumb_b.shape
        warped = cv2.warpPerspective(thumb_b.astype(np.float32), h, (wa, ha), flags=cv2.INTER_LINEAR)
        ones_b = np.ones((hb, wb), np.uint8)
        mask = cv2.warpPerspective(ones_b, h, (wa, ha), flags=cv2.INTER_NEAREST)
        mask = cv2.erode(mask, np.ones((5, 5), np.uint8)) > 0
        cover_a = float(mask.mean())
        back = cv2.warpPerspective(
            np.ones((ha, wa), np.uint8), np.linalg.inv(h), (wb, hb), flags=cv2.INTER_NEAREST
        )
        cover_b = float(back.mean())
        v = Verdict(False, n_in, 0.0, mirror, cover_a, cover_b)
        if max(cover_a, cover_b) < MIN_COVER:
            # no correlation needed: the verdict is no either way (a rejected verdict's NCC is not used)
            v.why = f"overlap covers only {max(cover_a, cover_b):.0%} of either frame"
        else:
            a = cv2.GaussianBlur(fa.thumb.astype(np.float32), (0, 0), 1.5)
            overlay, tiles = [0, 0], []
            v.ncc = tile_ncc(a, cv2.GaussianBlur(warped, (0, 0), 1.5), mask, overlay, tiles=tiles)
            agree = float(np.mean(np.asarray(tiles) >= min_ncc)) if tiles else 1.0
            if v.ncc < min_ncc:
                v.why = f"tile-median NCC {v.ncc:.2f} < {min_ncc}"
            elif agree < MIN_AGREE:
                v.why = f"only {agree:.0%} of the overlap's textured tiles correlate: a shared part, not the picture"
            else:
                # the keeper signals, only for an accepted pair: sharpness at equal scale (on the
                # unblurred grey copies), overlays, and what lies outside the overlap
                v.ok = True
                sharp: list[float] = []
                tile_ncc(fa.thumb.astype(np.float32), warped, mask, None, sharp)
                v.sharp = float(np.median(sharp)) if sharp else 1.0
                v.hscale = float(np.sqrt(abs(np.linalg.det((h / h[2, 2])[:2, :2]))))
                v.overlay_a, v.overlay_b = overlay
                v.pad_a, v.extra_a = _outside(fa.thumb, mask)
                v.pad_b, v.extra_b = _outside(thumb_b, back > 0)
        if v.ok and (not best.ok or v.ncc > best.ncc):
            best = v
        elif not best.ok and v.inliers >= best.inliers:
            best = v
    return best
