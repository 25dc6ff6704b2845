"""The dashboard's CSS, htmx and JavaScript, shipped as the package data of saescope.static (served at /static)."""
