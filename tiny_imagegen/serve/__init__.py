"""`tiny-imagegen serve`: models kept loaded behind an HTTP API, one job queue, and a web page.

An optional extra (`pip install "tiny_imagegen[serve]"`: Starlette and uvicorn); nothing in the rest
of the package imports this folder. The modules, top to bottom:

  params.py   a request's fields -> the `generate` command's arguments, checked by the command's
              own checks (commands/rendering.py `check_inputs`) plus the server's bounds
  pool.py     loaded pipelines, least-recently-used eviction under a memory budget
  jobs.py     the queue and its single worker: jobs in order, events per step, cancel
  app.py      the routes (OpenAI images API, /api/jobs, /api/images, /api/models), auth, limits
  openapi.py  the OpenAPI description served at /openapi.json
  cli.py      the command's flags; static/ the page (plain HTML, CSS and JS, no build step)

Images are made by the command's own code path (`rendering.render` and `metadata.save_png`), so a
job writes the same bytes as `tiny-imagegen generate` with the same parameters.
"""
