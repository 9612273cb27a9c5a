"""Link profiles of the emulated cluster: the rate every host's link carries and the latency
added between two hosts, parsed from text such as ``1gbe``, ``rate=2.5gbit`` or
``10gbe,delay=200us``, and the ``tc`` queueing discipline that enforces the rate.

A profile is a comma-separated list of at most one rate and one delay:

- the rate: a named profile (``1gbe``, ``10gbe``, ``25gbe``, ``unshaped``) or
  ``rate=<number><unit>`` with a unit of ``bit``, ``kbit``, ``mbit``, ``gbit`` or ``tbit``
  (``rate=2.5gbit``); none given: ``unshaped``;
- ``delay=<number><unit>`` with a unit of ``s``, ``ms`` or ``us``: the one-way latency added
  between any two hosts (half on each host's link, since a frame crosses two links on its way
  through the switch), so a round trip takes ``2 * delay`` longer.

A shaped link is a token-bucket filter (``tbf``) on each end of the host's link: the host's
end shapes what it sends, the switch's end what it receives, so the cap holds each way, as on a
full-duplex Ethernet port. The rate counts Ethernet frames without preamble, gap and check
sequence, so TCP's goodput ends a few percent below it, as on a real link.

The delay cannot come from the kernel here (no ``netem``, and neither ``fq`` nor ``etf``, the
qdiscs that honour a departure time a BPF program sets): a link with a delay is a pair of TAP
devices joined by a user-space delay line (:mod:`cnn.cluster.delay`) instead of a veth pair.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

#: named rates -> bits per second (None: no shaping, the link's own speed)
PROFILES = {"1gbe": 1e9, "10gbe": 10e9, "25gbe": 25e9, "unshaped": None}

#: the units of a ``rate=`` item, as ``tc`` spells them -> bits per second
RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
#: the units of a ``delay=`` item -> seconds
DELAY_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
#: the smallest rate ``tc`` shapes usefully (a 1500-byte frame in 1.5 s)
MIN_RATE = 8e3
#: the largest delay: a link is for a cluster's network, not a satellite
MAX_DELAY = 1.0

#: how long the bucket's burst lasts at the rate; at least :data:`MIN_BURST_BYTES`, so that a
#: 64 KiB segmentation-offload packet passes whole instead of being cut into frames
BURST_SECONDS = 1e-3
MIN_BURST_BYTES = 128 * 1024
#: the queue each shaped end holds before it drops, in time at the rate (a switch port's buffer)
QUEUE_SECONDS = 20e-3

_QUANTITY = re.compile(r"^([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)([a-z]+)$")

USAGE = (f"a link profile is a rate ({', '.join(PROFILES)} or rate=<number><unit>, unit "
         f"{', '.join(RATE_UNITS)}) and/or delay=<number><unit> (unit "
         f"{', '.join(DELAY_UNITS)}), separated by a comma: 1gbe, rate=2.5gbit, "
         f"10gbe,delay=200us")


def _quantity(text: str, units: dict) -> float | None:
    """``text`` (``2.5gbit``) in base units, or None when it is not a number with a unit."""
    match = _QUANTITY.match(text)
    if match is None or match.group(2) not in units:
        return None
    return float(match.group(1)) * units[match.group(2)]


def _si(value: float, units: tuple) -> str:
    """``value`` with the largest of ``units`` ((name, scale), largest first) it reaches."""
    for name, scale in units:
        if value >= scale:
            return f"{value / scale:g} {name}"
    name, scale = units[-1]
    return f"{value / scale:g} {name}"


@dataclass(frozen=True)
class LinkProfile:
    """What every host's link does: ``rate`` in bits per second each way (None: unshaped) and
    ``delay``, the one-way latency in seconds added between two hosts (0: none).

    ``name``: the profile as given, normalised (``1gbe``, ``rate=2.5gbit,delay=1ms``)."""
    name: str
    rate: float | None
    delay: float = 0.0

    @classmethod
    def parse(cls, text: "str | LinkProfile") -> "LinkProfile":
        """The profile ``text`` names; ``ValueError`` naming it and the accepted forms."""
        if isinstance(text, LinkProfile):
            return text
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{USAGE}. Received link={text!r}")
        rate_items, delay_items = [], []
        for item in (part.strip() for part in text.lower().split(",")):
            if item in PROFILES:
                rate_items.append((item, PROFILES[item]))
            elif item.startswith("rate="):
                rate = _quantity(item[len("rate="):], RATE_UNITS)
                if rate is None:
                    raise ValueError(f"{USAGE}. Received link={text!r}")
                if rate < MIN_RATE:
                    raise ValueError(f"a link rate must be at least {MIN_RATE:g} bit/s "
                                     f"(8kbit). Received link={text!r}")
                rate_items.append((item, rate))
            elif item.startswith("delay="):
                delay = _quantity(item[len("delay="):], DELAY_UNITS)
                if delay is None:
                    raise ValueError(f"{USAGE}. Received link={text!r}")
                if delay > MAX_DELAY:
                    raise ValueError(f"a link delay must be at most {MAX_DELAY:g} s. "
                                     f"Received link={text!r}")
                delay_items.append((item, delay))
            else:
                raise ValueError(f"{USAGE}. Received link={text!r}")
        if len(rate_items) > 1 or len(delay_items) > 1:
            raise ValueError(f"a link profile has one rate and one delay at most. "
                             f"Received link={text!r}")
        rate_name, rate = rate_items[0] if rate_items else ("unshaped", None)
        delay_name, delay = delay_items[0] if delay_items else ("", 0.0)
        name = rate_name if not delay else f"{rate_name},{delay_name}"
        return cls(name, rate, delay)

    def describe(self) -> str:
        """``1 Gbit/s each way, 200 us added one way``: the profile in words."""
        text = ("unshaped" if self.rate is None else
                _si(self.rate, (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6),
                                ("kbit/s", 1e3))) + " each way")
        if self.delay:
            text += f", {_si(self.delay, (('s', 1.0), ('ms', 1e-3), ('us', 1e-6)))} added one way"
        return text

    def qdisc(self) -> list[str] | None:
        """The ``tc qdisc add dev X root ...`` arguments that shape one end of a link, or None
        when the link is unshaped."""
        if self.rate is None:
            return None
        bytes_per_second = self.rate / 8
        burst = max(int(bytes_per_second * BURST_SECONDS), MIN_BURST_BYTES)
        limit = burst + int(bytes_per_second * QUEUE_SECONDS)
        return ["tbf", "rate", f"{int(self.rate)}bit", "burst", str(burst), "limit", str(limit)]

    def to_dict(self) -> dict:
        """The profile as JSON-ready values (what the cluster's state file records)."""
        return {"name": self.name, "rate_bit_per_s": self.rate, "delay_s": self.delay}
