"""What a call costs: the craftsman's configured price, else the genai-prices table by model.

genai-prices counts tokens the way providers bill them: cached prompt tokens at the cache-read
price, reasoning tokens inside the output tokens. A local craftsman is free unless priced; a
cloud craftsman whose model is not in the table has an unknown price, never a silent 0.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from ..config import Craftsman

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Price:
    """Prices per million tokens, and where they came from."""

    input_per_mtok: float
    output_per_mtok: float
    cache_read_per_mtok: float | None = None
    source: str = "config"

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        """USD for one call; cached prompt tokens at the cache-read price when there is one."""
        cached = min(cached_tokens, prompt_tokens)
        cache_price = self.input_per_mtok if self.cache_read_per_mtok is None \
            else self.cache_read_per_mtok
        return ((prompt_tokens - cached) * self.input_per_mtok + cached * cache_price
                + completion_tokens * self.output_per_mtok) / 1e6


FREE = Price(0.0, 0.0, source="local")


@functools.lru_cache(maxsize=64)
def _looked_up(model: str, provider: str | None, base_url: str | None) -> Price | None:
    from genai_prices import Usage, calc_price  # imported on first use: it loads a price table

    million = 1_000_000
    where = {"provider_id": provider} if provider else (
        {"provider_api_url": base_url} if base_url else {})
    try:
        calc = calc_price(Usage(input_tokens=million, output_tokens=million,
                                cache_read_tokens=million), model, **where)
        plain = calc_price(Usage(input_tokens=million, output_tokens=million), model, **where)
    except LookupError:
        return None
    # With every input token cached, the input part is the cache-read price alone.
    return Price(float(plain.input_price), float(plain.output_price), float(calc.input_price),
                 source=f"genai-prices:{plain.provider.id}/{plain.model.id}")


def price_of(craftsman: Craftsman, model: str | None = None) -> Price | None:
    """The price of a call to `model` (default: the craftsman's own); None when unknown.

    A configured `price:` is the price of the craftsman's own model: a task's model override
    on a cloud craftsman is looked up by its own name (and is unknown when the table lacks
    it, which a budget refuses). A local craftsman's price covers whatever it serves."""
    override = bool(model) and model != craftsman.model
    if craftsman.price is not None and (craftsman.local or not override):
        p = craftsman.price
        return Price(p.get("input_per_mtok", 0.0), p.get("output_per_mtok", 0.0),
                     p.get("cache_read_per_mtok"), source="config")
    if craftsman.local or craftsman.backend == "echo":
        return FREE
    where = craftsman.base_url or (craftsman.endpoints[0].base_url if craftsman.endpoints else None)
    found = _looked_up(model or craftsman.model, craftsman.provider, where)
    if found is None:
        log.warning("no price known for %s model %s; its cost is recorded as unknown (set "
                    "price: in the config)", craftsman.name, model or craftsman.model)
    return found


def cost_of(craftsman: Craftsman, model: str, usage: dict[str, int],
            reported: float | None = None) -> float | None:
    """A call's cost: what the craftsman reported (CLI agents), else its usage at the price of
    `model`, the model asked for (the server may name it otherwise, e.g. a dated snapshot)."""
    if reported is not None:
        return reported
    price = price_of(craftsman, model)
    if price is None:
        return None
    return price.cost(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                      usage.get("cached_tokens", 0))
