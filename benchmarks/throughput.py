"""Training-throughput benchmark: see osteo/bench.py (also `osteo bench`)."""
from osteo.bench import main

if __name__ == "__main__":
    main()
