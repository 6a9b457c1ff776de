"""Face-recognition door controller for the edge: detect → landmarks → align → embed → match → decide → door."""
import os

# On small ARM/x86 boards a multi-threaded BLAS is several times slower than one thread for this workload
# (measured ~9× on 2 vCPUs); set before numpy is first imported. An explicit environment setting still wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

__version__ = "0.1.0"
