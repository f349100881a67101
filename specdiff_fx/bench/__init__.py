"""``specdiff-fx bench``: our caching policies against plain Inductor and third-party caches
(diffusers' First Block Cache / TaylorSeer / MagCache hooks, cache-dit's DBCache) on the
reference model: speed-up, PSNR/SSIM vs the uncached images, class accuracy, FD, memory,
compile time and recompiles.  See :mod:`specdiff_fx.bench.command`.
"""
