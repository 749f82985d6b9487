"""Pages of the Streamlit app that app.py (the entry point) shows beside its own."""
