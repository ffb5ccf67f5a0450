"""The atlas in a browser: the FastAPI viewer (`saelab serve`) and the static export."""
