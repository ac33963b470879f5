"""affectjax: multitask affect recognition (expression, valence, arousal) in JAX.

Importing the package sets glibc's malloc so that XLA:CPU's step buffers
stay in the process instead of being mapped afresh at every step
(``affectjax.host_malloc``; ``AFFECTJAX_MALLOC=default`` keeps glibc's
settings). It runs here, at the first import, because it must precede the
threads that allocate.
"""
from affectjax import host_malloc as _host_malloc

_host_malloc.configure()
