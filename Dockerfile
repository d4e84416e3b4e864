# party-sockets relay image.
#
#   docker build -t party-sockets .
#   docker run --rm -p 8080:8080 --stop-timeout 300 party-sockets
#
# The Bun version is pinned to the one CI tests with (package.json devDependency
# "bun"); test/ops.test.ts fails when the two drift apart, and it runs the very
# `bun build` line below and smoke-tests the bundle it makes.

# ------------------------------------------------------------------ build stage
FROM oven/bun:1.4.5-alpine AS build
WORKDIR /src
# .dockerignore keeps the context to the relay's own sources (no tests, no
# node_modules). The relay imports nothing from npm at run time, so there is no
# install step: a bare-specifier import would make the build fail here, loudly.
COPY . .
# server.ts imports client.ts as text (served as /client.js), so this one file
# is the whole program.
RUN bun build server.ts --target=bun --outfile dist/server.js

# ---------------------------------------------------------------- runtime stage
FROM oven/bun:1.4.5-alpine
WORKDIR /home/bun/app
# Owned by root and read-only to the process: the relay never writes to disk.
COPY --from=build /src/dist/server.js dist/server.js
ENV PORT=8080 \
    NODE_ENV=production
# The image's unprivileged user (uid 1000), created by oven/bun.
USER bun
EXPOSE 8080
# The relay drains on SIGTERM: new creates are refused, live rooms play on, and
# the process exits 0 when the last room closes (or after DRAIN_TIMEOUT_MS,
# closing the rest with 1001). Give `docker stop` that long: --stop-timeout /
# `docker stop -t`, Docker's own default is only 10 s. With PEER_SECRET in the
# environment (pass it at run time, `-e PEER_SECRET=…`; never bake it in) and
# FLY_APP_NAME set, the rooms are handed to a peer first and the exit is quick.
STOPSIGNAL SIGTERM
# busybox wget ships in alpine; it exits non-zero on a refused connection, a
# timeout or any non-2xx answer.
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
  CMD wget -q -T 2 -O /dev/null "http://127.0.0.1:${PORT}/health" || exit 1
CMD ["bun", "run", "dist/server.js"]
