"""Multi-coil k-space simulated from real MR images, realistic where acquisitions differ from
clean pictures — because a network trained on simulated data is only as good as the simulator.

What a real acquisition has that a clean image does not, and how each is simulated here:
- **the object is wider than the phase field of view**: the image is placed on a canvas wider
  than the FOV, multiplied by the coil maps there, and folded (summed modulo the FOV width), so
  the fully sampled reference itself carries fold-over, as in the ESPIRiT brain slice;
- **coil maps with real spatial profiles**: coils on an ellipse around the head with a
  Biot–Savart-like magnitude fall-off and a phase that turns with the coil's position,
  evaluated on the wide canvas (so the folded parts see different sensitivities — the reason
  one set of SENSE maps fails on such data);
- **smooth image phase** (B0 / receive phase) and a smooth intensity bias;
- **zero-padded phase-encode columns**: only a central band of columns is acquired (e.g. 168 of
  256 in the ESPIRiT slice), the rest is zero;
- **measured noise**: complex Gaussian noise per coil at a level given relative to the image
  maximum; `measure_noise_ratio` reads it from a real scan's outermost readout rows.

The real images: nilearn ships the MNI ICBM152 2009 T1 template (with scalp) inside its wheel;
any 2-D float images (e.g. dipy's `t1_coronal_slice.npy`) also work.

    from podium.tasks.reconstruction.simulate import mni_slices, SimulationParams, simulate_slice
    images = mni_slices()
    sample = simulate_slice(images[40], SimulationParams(), np.random.default_rng(0))
    sample.kspace.shape   # (8, 320, 256) complex64, sample.target: RSS (320, 256)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from podium.errors import UserError
from podium.tasks.reconstruction.fft import fft2c_np, ifft2c_np

MNI_T1 = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
SCALP_STYLES = ("layered", "band")  # see add_scalp


@dataclass(frozen=True)
class SimulationParams:
    shape: tuple[int, int] = (320, 256)  # (readout H, phase W) of the k-space matrix
    num_coils: int = 8
    object_width: tuple[float, float] = (1.0, 1.2)  # head width / phase FOV (> 1 folds over)
    object_height: tuple[float, float] = (0.95, 1.05)  # head height / readout FOV
    rotation_deg: float = 10.0
    phase_band: tuple[float, float] = (0.6, 0.75)  # fraction of phase columns acquired (rest zero)
    noise_ratio: tuple[float, float] = (0.01, 0.02)  # k-space noise std / max of the RSS image
    coil_radius: tuple[float, float] = (1.2, 1.7)  # coil ellipse radius, in half-canvas units
    bias_strength: float = 0.3
    gamma: tuple[float, float] = (0.8, 1.25)  # contrast variation of the source image
    add_scalp: bool = True  # skull-stripped sources (the MNI template) get CSF, skull, fat, skin
    scalp: str = "layered"  # layered (skin, fat, galea, tables, diploe) | band (one textured fat band)
    fat_to_brain: tuple[float, float] = (1.0, 3.5)  # layered scalp: fat peak / brightest brain tissue
    real_maps_p: float = 0.0  # share of slices whose coil maps come from a CoilMapBank (real scans)


@dataclass
class SimulatedSlice:
    kspace: np.ndarray  # (C, H, W) complex64, fully sampled (zero outside the acquired band)
    target: np.ndarray  # (H, W) float32, RSS of the fully sampled k-space (the reference)
    padding: tuple[int, int]  # acquired columns are [left, right)
    maps: np.ndarray  # (C, H, W_canvas) complex64 coil maps on the wide canvas (for tests)


# ---- sources of real MR images ---------------------------------------------------------------
def _nilearn_volume(name: str) -> np.ndarray:
    import importlib.util

    import nibabel as nib

    # only the files inside nilearn's wheel are needed: locate them without importing nilearn
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("simulating from the MNI template needs nilearn (pip install nilearn).")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name
    if not path.exists():
        raise UserError(f"{path}: the MNI template is missing from this nilearn install.")
    return np.asarray(nib.load(str(path)).get_fdata(), dtype=np.float32)


def mni_volume() -> np.ndarray:
    """The MNI ICBM152 2009c T1 template (197 x 233 x 189, 1 mm) shipped in nilearn's wheel."""
    return _nilearn_volume(Path(MNI_T1).name)


def _orient(vol: np.ndarray, axis: str, step: int) -> list[np.ndarray]:
    if axis == "axial":  # rows anterior -> posterior, columns left -> right, as in the ESPIRiT slice
        return [vol[:, :, z].T[::-1] for z in range(0, vol.shape[2], step)]
    if axis == "coronal":
        return [vol[:, y, :].T[::-1] for y in range(0, vol.shape[1], step)]
    if axis == "sagittal":
        return [vol[x, :, :].T[::-1] for x in range(0, vol.shape[0], step)]
    raise UserError(f"axis={axis!r}: expected axial, coronal or sagittal.")


def mni_slices(axis: str = "axial", step: int = 2, min_fill: float = 0.25,
               tissues: bool = False) -> list[np.ndarray]:
    """2-D slices of the MNI template, oriented (anterior-posterior rows, left-right columns)
    for axial slices like the ESPIRiT brain slice; slices whose head covers less than
    `min_fill` of the picture are dropped. With `tissues`, each slice is a (3, H, W) stack of
    the T1 image and the grey- and white-matter probability maps, for `render_tissues`."""
    t1 = _orient(mni_volume(), axis, step)
    if tissues:
        gm = _orient(_nilearn_volume("mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"), axis, step)
        wm = _orient(_nilearn_volume("mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"), axis, step)
    out = []
    for i, s in enumerate(t1):
        s = np.ascontiguousarray(s, dtype=np.float32)
        if (s > 0.1 * s.max()).mean() < min_fill:
            continue
        s = s / s.max()
        out.append(np.stack([s, np.ascontiguousarray(gm[i]), np.ascontiguousarray(wm[i])]) if tissues else s)
    return out


def render_tissues(stack: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A T1-like image with crisp tissue boundaries and texture from (T1, GM, WM) maps.

    The MNI template is an average of 152 brains: far smoother than one real scan, so a network
    trained on it never sees the sharp sulci and fine texture whose aliasing it must undo. Here
    the grey/white/CSF labels are made crisp (argmax of the sharpened probabilities), given
    random T1-like intensities and a smooth texture, and blended with a little of the template
    (domain randomisation in the spirit of SynthSeg, Billot et al. 2023)."""
    t1, gm, wm = stack
    brain = (gm + wm) > 0.2
    csf = brain & (np.maximum(gm, wm) < 0.35)
    white = brain & ~csf & (wm >= gm)
    grey = brain & ~csf & ~white
    intensity = {"wm": rng.uniform(0.85, 1.0), "gm": rng.uniform(0.5, 0.9), "csf": rng.uniform(0.05, 0.2)}
    image = np.zeros_like(t1)
    image[white], image[grey], image[csf] = intensity["wm"], intensity["gm"], intensity["csf"]
    # thin dark CSF lines where grey matter meets grey matter across a sulcus (gm edges with no wm)
    sulci = brain & (ndimage.morphological_gradient(grey.astype(np.uint8), size=2) > 0) & ~white
    image[sulci & (rng.random(t1.shape) < 0.7)] = intensity["csf"]
    texture = ndimage.gaussian_filter(rng.normal(size=t1.shape), rng.uniform(0.5, 1.2))
    image = image * (1 + rng.uniform(0.04, 0.12) * texture / (texture.std() + 1e-12))
    image = ndimage.gaussian_filter(image, rng.uniform(0.2, 0.5))  # partial volume at the edges
    alpha = rng.uniform(0.0, 0.4)
    return np.clip((1 - alpha) * image + alpha * t1 * (image.max() / max(t1.max(), 1e-6)), 0, None).astype(np.float32)


def images_from_folder(folder: str | os.PathLike) -> list[np.ndarray]:
    """Grayscale images (PNG/JPEG/TIFF) or 2-D/3-D `.npy` arrays from a folder, scaled to [0, 1]."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: simulation source folder not found.")
    out = []
    for path in sorted(folder.iterdir()):
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False).astype(np.float32)
            arrs = [arr] if arr.ndim == 2 else [arr[..., i] for i in range(arr.shape[-1])]
        elif path.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
            arrs = [np.asarray(Image.open(path).convert("F"), dtype=np.float32)]
        else:
            continue
        out += [a / a.max() for a in arrs if a.ndim == 2 and a.max() > 0]
    if not out:
        raise UserError(f"{folder}: no images (.png/.jpg/.tif/.npy) to simulate from.")
    return out


# ---- physics pieces --------------------------------------------------------------------------
def coil_maps(num_coils: int, shape: tuple[int, int], rng: np.random.Generator,
              radius: float = 1.15) -> np.ndarray:
    """Surface-coil sensitivities on an elliptical array around the object.

    Magnitude falls off like a loop's field, ((d / r0)^2 + 1)^(-3/2) with d the distance to the
    coil; the phase is an offset plus linear ramps (up to about a cycle across the image).
    Maps are returned unnormalised (their RSS is not 1): the shading they cause is real."""
    h, w = shape
    y, x = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-w / h, w / h, w) * 1.0, indexing="ij")
    start = rng.uniform(0, 2 * np.pi)
    maps = np.empty((num_coils, h, w), np.complex64)
    for c in range(num_coils):
        angle = start + 2 * np.pi * c / num_coils + rng.normal(0, 0.1)
        cy, cx = radius * np.sin(angle), radius * (w / h) * np.cos(angle)
        d2 = (y - cy) ** 2 + (x - cx) ** 2
        # broad loops: a head coil's elements each see about half the head (as in the ESPIRiT
        # scan's maps); narrow maps would make unfolding easier than on real data
        r0 = rng.uniform(0.9, 1.6)
        magnitude = (d2 / r0**2 + 1.0) ** -1.5
        # receive phase: an offset plus ramps of up to about one cycle across the FOV, mostly
        # along the phase-encode direction (what the ESPIRiT scan's calibration shows)
        phase = angle + rng.uniform(-3, 3) * x + rng.uniform(-1.5, 1.5) * y
        maps[c] = magnitude * np.exp(1j * phase)
    return maps


def smooth_field(shape: tuple[int, int], rng: np.random.Generator, scale: float, cutoff: int = 3) -> np.ndarray:
    """A random field with only the lowest `cutoff` spatial frequencies, unit peak, times scale."""
    coeffs = np.zeros(shape, np.complex128)
    h, w = shape
    cy, cx = h // 2, w // 2
    coeffs[cy - cutoff:cy + cutoff + 1, cx - cutoff:cx + cutoff + 1] = (
        rng.normal(size=(2 * cutoff + 1, 2 * cutoff + 1)) + 1j * rng.normal(size=(2 * cutoff + 1, 2 * cutoff + 1)))
    field = np.real(ifft2c_np(coeffs))
    return scale * field / (np.abs(field).max() + 1e-12)


def add_scalp(image: np.ndarray, rng: np.random.Generator, style: str = "layered",
              fat_to_brain: tuple[float, float] = (1.0, 3.5)) -> np.ndarray:
    """Surround a skull-stripped brain (the MNI template is one) with the layers a T1 head scan
    shows, because the bright outer ring is what folds over and what ghosts at high acceleration.
    Thicknesses in source pixels (1 mm).

    `layered`: from the brain outwards dark CSF, the dark inner table, the diploe (marrow, from
    absent to bright), the dark outer table, a dark galea line, bright subcutaneous fat and the
    skin — thin smooth rings with sharp edges, as T1 head scans show them. The brightness scale
    (`peak`) is `fat_to_brain` (default 1-3.5) times the brightest brain tissue, and the fat gets
    0.7-1 of it (T1 shortening by fat; brighter still near the coils).
    `band`: one thick textured fat band over dark CSF/skull, fat 1.2-2 times the brain (the
    earlier, cruder model; `fat_to_brain` does not apply)."""
    if style not in SCALP_STYLES:
        raise UserError(f"data.scalp={style!r}: expected one of {', '.join(SCALP_STYLES)}.")
    pad = 24
    image = np.pad(image, pad)
    brain = ndimage.binary_fill_holes(image > 0.08 * image.max())
    dist = ndimage.distance_transform_edt(~brain)
    if style == "band":  # the earlier model's draws, unchanged (its simulations stay reproducible)
        csf, skull, fat, skin = (rng.uniform(1, 3), rng.uniform(3, 6), rng.uniform(3, 6), rng.uniform(1, 2))
        texture = 1 + 0.12 * ndimage.gaussian_filter(rng.normal(size=image.shape), 0.8) / 0.25
        peak = float(image.max()) * rng.uniform(1.2, 2.0)
        layers = np.select(
            [dist <= 0, dist < csf, dist < csf + skull, dist < csf + skull + fat, dist < csf + skull + fat + skin],
            [image, 0.06 * peak, peak * (0.04 + 0.25 * (np.abs(dist - csf - skull / 2) < 1)), peak * texture,
             rng.uniform(0.4, 0.6) * peak], 0.0)
        return np.clip(ndimage.gaussian_filter(layers, 0.4), 0, None).astype(np.float32)
    peak = float(image.max()) * rng.uniform(*fat_to_brain)
    # (thickness range in mm, brightness range relative to peak), brain outwards
    spec = [((1.0, 3.0), (0.02, 0.10)),   # CSF
            ((1.0, 2.5), (0.0, 0.05)),    # inner table (cortical bone: no signal)
            ((0.0, 5.0), (0.15, 0.8)),    # diploe (fatty marrow), absent in thin skulls
            ((1.0, 2.5), (0.0, 0.05)),    # outer table
            ((0.5, 1.5), (0.05, 0.3)),    # galea / fascia
            ((2.0, 6.0), (0.7, 1.0)),     # subcutaneous fat
            ((0.5, 2.0), (0.3, 0.7))]     # skin
    # the scalp is thicker in some directions than others: a smooth random thickness factor
    factor = 1 + smooth_field(image.shape, rng, rng.uniform(0.1, 0.35), cutoff=2)
    layers = np.where(brain, image, 0.0)
    outer = np.zeros(image.shape)
    for (thick, bright) in spec:
        inner, outer = outer, outer + rng.uniform(*thick) * factor
        shell = ~brain & (dist > inner) & (dist <= outer)
        layers[shell] = rng.uniform(*bright) * peak
    texture = ndimage.gaussian_filter(rng.normal(size=image.shape), 1.5)
    layers = layers * np.where(brain, 1.0, 1 + rng.uniform(0.0, 0.08) * texture / (texture.std() + 1e-12))
    return np.clip(ndimage.gaussian_filter(layers, rng.uniform(0.3, 0.6)), 0, None).astype(np.float32)


def place_on_canvas(image: np.ndarray, params: SimulationParams, rng: np.random.Generator) -> np.ndarray:
    """Resize/rotate `image` so the head spans the drawn fraction of the readout and phase FOVs,
    on a canvas wide enough to hold the part that will fold over."""
    h, w = params.shape
    if image.ndim == 3:  # a (T1, GM, WM) stack: render a crisp, textured T1-like image
        image = render_tissues(image, rng)
    if params.add_scalp:
        image = add_scalp(image, rng, params.scalp, params.fat_to_brain)
    rows, cols = np.nonzero(image > 0.1 * image.max())
    image = image[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    if params.rotation_deg:
        image = ndimage.rotate(image, rng.uniform(-params.rotation_deg, params.rotation_deg),
                               reshape=True, order=1, mode="constant")
    if rng.random() < 0.5:
        image = image[:, ::-1]
    target_h = int(round(h * rng.uniform(*params.object_height)))
    target_w = int(round(w * rng.uniform(*params.object_width)))
    zoom = (target_h / image.shape[0], target_w / image.shape[1])
    image = np.clip(ndimage.zoom(image, zoom, order=3), 0, None)
    image = image ** rng.uniform(*params.gamma)
    canvas_w = max(w, image.shape[1]) + 16
    canvas = np.zeros((h, canvas_w), np.float32)
    top = (h - image.shape[0]) // 2 + int(rng.integers(-4, 5))
    top = int(np.clip(top, 0, max(0, h - image.shape[0])))
    left = (canvas_w - image.shape[1]) // 2
    ih = min(image.shape[0], h - top)
    canvas[top:top + ih, left:left + image.shape[1]] = image[:ih]
    return canvas


def fold(coil_images: np.ndarray, width: int) -> np.ndarray:
    """Sum a wide canvas modulo the phase FOV: what sampling k-space at 1/FOV does to an object
    wider than the FOV. The canvas centre maps to the FOV centre."""
    canvas_w = coil_images.shape[-1]
    offset = (canvas_w - width) // 2
    cols = (np.arange(canvas_w) - offset) % width
    out = np.zeros(coil_images.shape[:-1] + (width,), coil_images.dtype)
    for start in range(0, canvas_w, width):  # a few vectorised passes, no np.add.at
        chunk = slice(start, min(start + width, canvas_w))
        out[..., cols[chunk]] += coil_images[..., chunk]
    return out


def band_limits(width: int, fraction: float) -> tuple[int, int]:
    """Acquired phase columns [left, right) of a centred band (zero-padded k-space outside)."""
    n = int(round(width * fraction))
    left = (width - n + 1) // 2
    return left, left + n


def rss_image(kspace: np.ndarray) -> np.ndarray:
    return np.sqrt((np.abs(ifft2c_np(kspace)) ** 2).sum(0)).astype(np.float32)


def simulate_slice(image: np.ndarray, params: SimulationParams, rng: np.random.Generator,
                   coil_bank=None) -> SimulatedSlice:
    """One fully sampled multi-coil slice (and its RSS reference) from a real 2-D image.

    With a `coil_bank` (coil_bank.CoilMapBank), a share `params.real_maps_p` of slices use coil
    maps measured on real scans instead of the analytic surface coils."""
    h, w = params.shape
    canvas = place_on_canvas(image, params, rng)
    bias = np.exp(smooth_field(canvas.shape, rng, params.bias_strength))
    phase = smooth_field(canvas.shape, rng, rng.uniform(0, np.pi / 2), cutoff=2)  # B0 / object phase
    obj = canvas * bias * np.exp(1j * phase)
    if coil_bank is not None and params.real_maps_p > 0 and rng.random() < params.real_maps_p:
        from podium.tasks.reconstruction.coil_bank import tile_to_canvas

        if coil_bank.num_coils != params.num_coils:
            raise UserError(f"data.coil_maps: the scans have {coil_bank.num_coils} coils, "
                            f"data.num_coils is {params.num_coils}.")
        maps = tile_to_canvas(coil_bank.draw((h, w), rng), canvas.shape[1])
    else:
        maps = coil_maps(params.num_coils, canvas.shape, rng, rng.uniform(*params.coil_radius))
    coil_images = fold(maps * obj[None], w)
    kspace = fft2c_np(coil_images)
    clean_max = float(np.sqrt((np.abs(coil_images) ** 2).sum(0)).max())
    sigma = rng.uniform(*params.noise_ratio) * clean_max
    kspace = kspace + sigma * (rng.normal(size=kspace.shape) + 1j * rng.normal(size=kspace.shape)) / np.sqrt(2)
    left, right = band_limits(w, rng.uniform(*params.phase_band))
    kspace[..., :left] = 0
    kspace[..., right:] = 0
    kspace = kspace.astype(np.complex64)
    return SimulatedSlice(kspace=kspace, target=rss_image(kspace), padding=(left, right), maps=maps)


def measure_noise_ratio(kspace: np.ndarray, rows: int = 6) -> float:
    """Noise std of a real scan (outermost readout rows of the acquired band, where the signal
    has died out; robust MAD estimate of the real part, averaged over coils) over the maximum
    of its RSS image — the `noise_ratio` that makes simulated data as noisy as that scan."""
    acquired = np.nonzero(np.abs(kspace).sum(axis=(0, 1)) > 0)[0]
    band = kspace[:, :, acquired.min():acquired.max() + 1]
    edge = np.concatenate([band[:, :rows], band[:, -rows:]], axis=1)
    sigma = np.median([np.median(np.abs(e.real - np.median(e.real))) / 0.6745 for e in edge])
    # the simulator's complex noise has std sigma_c with real-part std sigma_c / sqrt(2)
    return float(sigma * np.sqrt(2) / rss_image(kspace).max())


def simulate_volume_h5(path: str | os.PathLike, images: list[np.ndarray], params: SimulationParams,
                       seed: int, acquisition: str = "AXT1_SIM", coil_bank=None) -> Path:
    """Write simulated slices as one fastMRI-format HDF5 volume (`kspace`, `reconstruction_rss`,
    `ismrmrd_header` with the acquired band as the encoding limits, attrs max/norm)."""
    from podium.tasks.reconstruction.readers import write_fastmri_h5

    rng = np.random.default_rng(seed)
    slices = [simulate_slice(img, params, rng, coil_bank) for img in images]
    # one volume shares one band (a scan has one matrix): cut every slice to the narrowest band,
    # so every column inside the header's encoding limits holds data in every slice
    left, right = max(s.padding[0] for s in slices), min(s.padding[1] for s in slices)
    kspace = np.stack([s.kspace for s in slices])
    kspace[..., :left] = 0
    kspace[..., right:] = 0
    target = np.stack([rss_image(k) for k in kspace])
    return write_fastmri_h5(path, kspace, target, recon_size=params.shape, padding=(left, right),
                            acquisition=acquisition)
