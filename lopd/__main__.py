from lopd.cli import app

app(prog_name="lopd")
