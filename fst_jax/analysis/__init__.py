"""Reading finished runs: their records (`runs`) and the comparison report of several methods and seeds
(`compare_report`, `compare_plot`), as `launch/plot.py` and `launch/compare.py` print and plot them."""
