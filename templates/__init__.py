"""The dashboard's Jinja2 templates, shipped as the package data of saescope.templates (see app/web/templates.py)."""
