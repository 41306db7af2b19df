"""Server-side aggregation: pure numpy functions and the thin Flower strategies that call them."""
