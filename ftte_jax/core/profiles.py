"""Device classes as they come: microcontroller, wearable, low- and high-end
phone, each with its compute, memory, links and energy from published
figures, drawn so that a weak device is weak in every resource.

A fleet profile (``FleetConfig.fleet_profile``) is a mix of classes with
probabilities, e.g. ``mcu:0.6,phone_low:0.2,phone_high:0.2``. Class counts
are exact (largest remainder of ``p * N``), shuffled by the seed. Within a
class every resource is drawn log-uniformly between the class's low and
high figure; the draws of one device are tied by a Gaussian copula with
correlation ``class_correlation`` (1: the device sits at the same quantile
of every range, so the slowest microcontroller also has the least SRAM and
the slowest link; 0: independent within the class). Across classes the
ranges are ordered, so the fleet's resources are correlated whatever the
copula. Energy constants are per class (compute, idle) and per link (radio).

Every figure below names its source in ``SOURCES``; the figures were taken
from those works to their order of magnitude (docs/design.md, "Device-class
profiles", lists them). Training memory of the wearable and phone classes is
our choice: 1/16 of the device's RAM, for one background training job; for
the MB-scale models here any such value lets the device train the whole
model, so in these studies the microcontrollers are exactly the
memory-constrained devices.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

KB, MB, GB = 1024.0, 1024.0 ** 2, 1024.0 ** 3

SOURCES = {
    "stm32f746": "STMicroelectronics STM32F745xx/STM32F746xx datasheet: "
                 "Cortex-M7 at 216 MHz with single-precision FPU, 320 KB "
                 "SRAM, 1 MB flash",
    "nrf52840": "Nordic Semiconductor nRF52840 product specification: "
                "Cortex-M4F at 64 MHz, 256 KB RAM, 1 MB flash, Bluetooth 5",
    "tte": "Lin et al., On-Device Training Under 256KB Memory, NeurIPS 2022 "
           "(the Tiny Training Engine trains within 256 KB of SRAM, weights "
           "in flash)",
    "cortex_m_fpu": "Arm Cortex-M4/M7 technical reference manuals: one "
                    "single-precision fused multiply-add per cycle at best "
                    "(M7 dual-issue); 0.1-0.4 GFLOP/s at 64-216 MHz",
    "mlperf_tiny": "Banbury et al., MLPerf Tiny Benchmark, NeurIPS Datasets "
                   "and Benchmarks 2021 (Cortex-M4/M7 reference boards, "
                   "tens to hundreds of ms per inference of 1-10 MOP models)",
    "ble": "Tosi et al., Performance Evaluation of Bluetooth Low Energy: a "
           "Systematic Review, Sensors 17(12) 2017: about 230 kbit/s at most "
           "in theory, about 100 kbit/s measured in applications",
    "ble_energy": "Siekkinen et al., How Low Energy is Bluetooth Low "
                  "Energy?, IEEE WCNCW 2012: about 0.15 uJ/bit",
    "wifi_3g_energy": "Balasubramanian et al., Energy Consumption in Mobile "
                      "Phones, IMC 2009: about 0.007 J/KB on Wi-Fi and 0.025 "
                      "J/KB on 3G (tail energy aside); 3G uplink below 1 "
                      "Mbit/s",
    "lte": "Huang et al., A Close Examination of Performance and Power "
           "Characteristics of 4G LTE Networks, MobiSys 2012: LTE median "
           "uplink about 5.6 Mbit/s and downlink about 12.7 Mbit/s; energy "
           "per bit of the order of 3G's",
    "wifi_speeds": "Ookla Speedtest Global Index and Opensignal mobile "
                   "reports (2020-2023): phone uploads of a few to tens of "
                   "Mbit/s on Wi-Fi, single-stream 802.11n devices at the "
                   "low end",
    "ai_benchmark": "Ignatov et al., AI Benchmark: All About Deep Learning "
                    "on Smartphones in 2019, ICCVW 2019: about an order of "
                    "magnitude between low-end and flagship SoCs",
    "arm_a_cores": "Arm Cortex-A53 and Cortex-A7x/X software optimization "
                   "guides: 4 FP32 FLOP/cycle per A53 core (64-bit NEON), "
                   "16 per big core; sustained training reaches a fraction "
                   "of peak",
    "android_go": "Android 11 Go edition Device Configuration Guide (as "
                  "reported by XDA Developers, 2020): devices with 2 GB of "
                  "RAM or less ship as Android Go",
    "watch_ram": "Samsung Galaxy Watch4 (1.5 GB RAM) and Google Pixel Watch "
                 "(2 GB RAM) specification sheets",
    "flagship_ram": "2022-2023 flagship phone specification sheets: 8-12 GB "
                    "RAM",
    "compute_energy": "phone-class CPU ~1e-10 J/FLOP (a few W at tens of "
                      "GFLOP/s); Cortex-M class ~1e-9 J/FLOP (~0.1-0.3 nJ "
                      "per cycle, vendor datasheets, under one FLOP a cycle)",
    "idle": "Carroll and Heiser, An Analysis of Power Consumption in a "
            "Smartphone, USENIX ATC 2010: tens to hundreds of mW awake; a "
            "sleeping microcontroller draws about a mW or less (datasheets)",
    "ours": "our choice (no published figure)",
}


@dataclasses.dataclass(frozen=True)
class Link:
  """A radio: bandwidth ranges (bytes/s) and energy per byte (J)."""

  up: tuple[float, float]
  down: tuple[float, float]
  j_per_byte: float
  sources: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class DeviceClass:
  """One class of device: ranges (low, high) drawn log-uniformly."""

  name: str
  speed_flops: tuple[float, float]  # sustained training FLOP/s.
  memory_bytes: tuple[float, float]  # RAM available for training.
  links: dict  # link name -> Link the class can use.
  j_per_flop: float
  idle_w: float
  sources: tuple[str, ...]


# 8 bits a byte: bit/s figures of the sources become bytes/s.
_LTE = Link(up=(0.35e6, 1.0e6), down=(0.8e6, 3.0e6), j_per_byte=2.5e-5,
            sources=("lte", "wifi_3g_energy"))
_3G = Link(up=(0.03e6, 0.125e6), down=(0.125e6, 0.25e6), j_per_byte=2.5e-5,
           sources=("wifi_3g_energy",))

CLASSES = (
    DeviceClass(
        "mcu", speed_flops=(1e8, 4e8), memory_bytes=(256 * KB, 512 * KB),
        links={"ble": Link(up=(12.5e3, 28.75e3), down=(12.5e3, 28.75e3),
                           j_per_byte=1.2e-6, sources=("ble", "ble_energy"))},
        j_per_flop=1e-9, idle_w=1e-3,
        sources=("stm32f746", "nrf52840", "tte", "cortex_m_fpu",
                 "mlperf_tiny", "compute_energy", "idle")),
    DeviceClass(
        "wearable", speed_flops=(5e8, 2e9), memory_bytes=(96 * MB, 128 * MB),
        links={"wifi": Link(up=(0.125e6, 1e6), down=(0.25e6, 2e6),
                            j_per_byte=7e-6,
                            sources=("wifi_speeds", "wifi_3g_energy")),
               "lte": _LTE, "3g": _3G},
        j_per_flop=1e-10, idle_w=0.1,
        sources=("arm_a_cores", "watch_ram", "ours", "compute_energy",
                 "idle")),
    DeviceClass(
        "phone_low", speed_flops=(2e9, 8e9), memory_bytes=(64 * MB, 128 * MB),
        links={"wifi": Link(up=(0.25e6, 2e6), down=(1e6, 8e6),
                            j_per_byte=7e-6,
                            sources=("wifi_speeds", "wifi_3g_energy")),
               "lte": _LTE, "3g": _3G},
        j_per_flop=1e-10, idle_w=0.1,
        sources=("arm_a_cores", "ai_benchmark", "android_go", "ours",
                 "compute_energy", "idle")),
    DeviceClass(
        "phone_high", speed_flops=(1e10, 5e10),
        memory_bytes=(512 * MB, 768 * MB),
        links={"wifi": Link(up=(1e6, 5e6), down=(4e6, 20e6), j_per_byte=7e-6,
                            sources=("wifi_speeds", "wifi_3g_energy")),
               "lte": _LTE, "3g": _3G},
        j_per_flop=1e-10, idle_w=0.1,
        sources=("arm_a_cores", "ai_benchmark", "flagship_ram", "ours",
                 "compute_energy", "idle")),
)
CLASS_NAMES = tuple(c.name for c in CLASSES)  # weakest first.
BY_NAME = {c.name: c for c in CLASSES}
# Links a phone_link option may pick; a microcontroller always uses BLE.
PHONE_LINKS = ("wifi", "lte", "3g")
INDEPENDENT = "independent"  # FleetConfig's drawn-independently profile.


def parse_mix(text: str) -> tuple[tuple[str, float], ...] | None:
  """``(class, probability)`` pairs of a profile, weakest first; None for
  ``independent``.

  ``text`` is ``independent``, one class name (every device of it), or
  ``name:p,name:p,...`` with probabilities in (0, 1] summing to 1.

  Raises:
    ValueError: naming ``fleet_profile`` and what is valid.
  """
  if not isinstance(text, str) or not text.strip():
    raise ValueError(f"fleet_profile must be a string, got {text!r}")
  text = text.strip()
  if text == INDEPENDENT:
    return None
  valid = (f"valid: '{INDEPENDENT}', a class name, or name:p,name:p,... "
           f"with classes {list(CLASS_NAMES)} and probabilities summing to 1")
  pairs = {}
  for part in text.split(","):
    name, sep, p = part.strip().partition(":")
    name = name.strip()
    if name not in BY_NAME:
      raise ValueError(f"fleet_profile: unknown class {name!r} in {text!r}; "
                       f"{valid}")
    if name in pairs:
      raise ValueError(f"fleet_profile: class {name!r} given twice in "
                       f"{text!r}")
    try:
      prob = float(p) if sep else 1.0
    except ValueError:
      raise ValueError(f"fleet_profile: {p!r} is not a probability in "
                       f"{text!r}; {valid}") from None
    if not 0 < prob <= 1 or not math.isfinite(prob):
      raise ValueError(f"fleet_profile: probability of {name!r} must be in "
                       f"(0, 1], got {p!r}")
    pairs[name] = prob
  if abs(sum(pairs.values()) - 1.0) > 1e-6:
    raise ValueError(f"fleet_profile: probabilities sum to "
                     f"{sum(pairs.values()):g}, not 1, in {text!r}")
  return tuple((n, pairs[n]) for n in CLASS_NAMES if n in pairs)


def class_counts(probs: np.ndarray, n: int) -> np.ndarray:
  """Devices per class: ``floor(p * n)`` plus one for the largest
  remainders (ties to the earlier class), summing to ``n``."""
  raw = np.asarray(probs, np.float64) * n
  counts = np.floor(raw + 1e-9).astype(np.int64)
  rest = n - int(counts.sum())
  counts[np.argsort(-(raw - counts), kind="stable")[:rest]] += 1
  return counts


def draw_classes(mix, n: int, seed_seq) -> np.ndarray:
  """[n] int32 class of each device: its index in ``mix`` (weakest first),
  exact counts (``class_counts``) in a seeded random order."""
  counts = class_counts([p for _, p in mix], n)
  labels = np.repeat(np.arange(len(mix), dtype=np.int32), counts)
  return np.random.default_rng(seed_seq).permutation(labels)


def _normal_cdf(x: np.ndarray) -> np.ndarray:
  return 0.5 * np.vectorize(math.erfc, otypes=[np.float64])(
      -np.asarray(x, np.float64) / math.sqrt(2.0))


def _log_uniform(lo_hi: tuple[float, float], u: np.ndarray) -> np.ndarray:
  lo, hi = lo_hi
  return lo * (hi / lo) ** u


def draw_resources(mix, cls: np.ndarray, phone_link: str,
                   correlation: float, seed_seq) -> dict[str, np.ndarray]:
  """Each device's resources from its class (``draw_classes``).

  Returns:
    [N] float64 arrays ``speed``, ``memory``, ``bw_up``, ``bw_down``,
    ``j_per_flop``, ``j_per_byte_up``, ``j_per_byte_down``, ``idle_w``, and
    ``quantile`` [N, 4]: the copula's uniform draw of each device for speed,
    memory, uplink and downlink (for tests and reports).
  """
  if phone_link not in PHONE_LINKS:
    raise ValueError(f"phone_link must be one of {PHONE_LINKS}, got "
                     f"{phone_link!r}")
  if not 0 <= correlation <= 1:
    raise ValueError(f"class_correlation must be in [0, 1], got "
                     f"{correlation!r}")
  n = cls.shape[0]
  rng = np.random.default_rng(seed_seq)
  z = rng.standard_normal(n)
  eps = rng.standard_normal((n, 4))
  # One shared factor: any two resources of a device have Gaussian
  # correlation ``correlation`` (each latent has unit variance).
  u = _normal_cdf(math.sqrt(correlation) * z[:, None] +
                  math.sqrt(1.0 - correlation) * eps)
  out = {k: np.zeros(n) for k in ("speed", "memory", "bw_up", "bw_down",
                                  "j_per_flop", "j_per_byte_up",
                                  "j_per_byte_down", "idle_w")}
  for i, (name, _) in enumerate(mix):
    c = BY_NAME[name]
    on = cls == i
    link = c.links.get(phone_link) or next(iter(c.links.values()))
    out["speed"][on] = _log_uniform(c.speed_flops, u[on, 0])
    out["memory"][on] = _log_uniform(c.memory_bytes, u[on, 1])
    out["bw_up"][on] = _log_uniform(link.up, u[on, 2])
    out["bw_down"][on] = _log_uniform(link.down, u[on, 3])
    out["j_per_flop"][on] = c.j_per_flop
    out["j_per_byte_up"][on] = link.j_per_byte
    out["j_per_byte_down"][on] = link.j_per_byte
    out["idle_w"][on] = c.idle_w
  out["quantile"] = u
  return out


def table() -> list[dict]:
  """The classes' figures with their sources, for docs and reports."""
  rows = []
  for c in CLASSES:
    for link_name, link in c.links.items():
      rows.append({
          "class": c.name, "link": link_name,
          "speed_gflops": [s / 1e9 for s in c.speed_flops],
          "memory_mb": [m / MB for m in c.memory_bytes],
          "up_mb_s": [b / 1e6 for b in link.up],
          "down_mb_s": [b / 1e6 for b in link.down],
          "j_per_flop": c.j_per_flop, "j_per_byte": link.j_per_byte,
          "idle_w": c.idle_w,
          "sources": [SOURCES[s] for s in c.sources + link.sources]})
  return rows
