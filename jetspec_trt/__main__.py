"""`python -m jetspec_trt ...` is `jetspec-trt ...` (for machines where the script is not on PATH)."""

from jetspec_trt.cli import main

main()
