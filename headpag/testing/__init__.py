"""
Test oracles: independent implementations that a pipeline call never runs, kept to check the production code against.

- [`explicit`]: processors that materialise the `L x L` attention map and blend `(1 - u) A + u T` explicitly.
- [`processors`]: an independent, processor-swapping implementation of head-level PAG (`reference_forward`).
- [`combine`]: the guidance formula `v_u + g (v_c - v_u) + s (v_c - v_p)` as plain arithmetic.

Nothing under `headpag/` outside this package imports it (an import-linter contract checks it).
"""
