BUDGET_S=215 MAMBA_JOBS=12 timeout -k 5 238 bash benchmarks/scan_bwd_session.sh; echo "scan_bwd_session.sh rc=$?"
