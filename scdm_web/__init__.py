"""scdm-web: browse a store's benchmark results and predict new samples in a browser."""
