# Sourced by the benchmark scripts: `need COMMAND[:PACKAGE]...` installs, from apt, the
# packages of the commands the machine lacks (the tools Strata is compared against are never
# test dependencies, so each benchmark installs its own).
need() {
  local missing=() item command package
  for item in "$@"; do
    command=${item%%:*}
    package=${item#*:}
    command -v "$command" >/dev/null || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
}
