#!/usr/bin/env bash
# test_arch: checks every #include of the source tree against the layering in layers.txt.
#
#   check_layers.sh SOURCE_DIR [RULES]   exit 0 when every include keeps the rules, 1 with one
#                                        "file:line: ..." per broken include, 2 on a bad rules file
#   check_layers.sh --self-test [RULES]  builds small trees that break each kind of rule on
#                                        purpose and checks that each break is caught, by file:line
#
# Includes are bare names ("kv_cache.h"), found through CMake include directories, so a quoted
# include is resolved by its base name against every header of the source tree and tests/support;
# a name that two headers share, or that no header has (and no rule says is generated), is an
# error too: the rule could not be checked.
set -uo pipefail
set -f # rules hold patterns ("common/*"): never expand them against files

here=$(cd "$(dirname "$0")" && pwd)

die() { echo "test_arch: $*" >&2; exit 2; }

# check SRC RULES: prints violations, returns 0 (clean) or 1.
check() {
    local src=$1 rules=$2
    declare -A allow=() sys_allow=() generated=() header_at=()
    local -a parts=() sys_patterns=()
    local kind rest names targets n
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line%%#*}
        [[ $line =~ ^[[:space:]]*$ ]] && continue
        [[ $line == *:* ]] || die "$rules: no ':' in \"$line\""
        kind=${line%%[[:space:]]*}
        rest=${line#"$kind"}
        names=${rest%%:*}
        targets=${rest#*:}
        case $kind in
        part)
            names=$(echo $names)
            parts+=("$names")
            allow[$names]=$(echo $targets)
            ;;
        system)
            for n in $names; do
                sys_patterns+=("$n")
                sys_allow[$n]=$(echo $targets)
            done
            ;;
        generated) generated[$(echo $names)]=$(echo $targets) ;;
        *) die "$rules: unknown rule \"$kind\"" ;;
        esac
    done <"$rules"
    [ ${#parts[@]} -gt 0 ] || die "$rules: no parts"

    # part_of PATH: the longest part holding PATH (relative to src), or "" (tests/support: "tests")
    part_of() {
        local p=$1 best="" q
        for q in "${parts[@]}"; do
            if [[ $p == "$q"/* ]] && [ ${#q} -gt ${#best} ]; then best=$q; fi
        done
        if [ -z "$best" ] && [[ $p == tests/* ]]; then best=tests; fi
        printf '%s' "$best"
    }
    # allowed FROM TO HEADER: may part FROM include HEADER, which lies in part TO?
    allowed() {
        local from=$1 to=$2 header=$3 a
        [ "$from" = "$to" ] && return 0
        for a in ${allow[$from]}; do
            [ "$a" = "$header" ] && return 0
            part_matches "$a" "$to" && return 0
        done
        return 1
    }

    local -a files=()
    local top f
    for top in $(for p in "${parts[@]}"; do echo "${p%%/*}"; done | sort -u); do
        [ -d "$src/$top" ] || continue
        while IFS= read -r f; do files+=("${f#"$src"/}"); done < <(find "$src/$top" -type f \
            \( -name '*.c' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) | sort)
    done
    if [ -d "$src/tests/support" ]; then
        while IFS= read -r f; do files+=("${f#"$src"/}"); done < <(find "$src/tests/support" -type f -name '*.h' | sort)
    fi
    for f in "${files[@]}"; do
        case $f in *.h | *.cuh) ;; *) continue ;; esac
        n=${f##*/}
        if [ -n "${header_at[$n]:-}" ]; then header_at[$n]="${header_at[$n]} $f"; else header_at[$n]=$f; fi
    done

    local bad=0 from lineno text h to where pat ok
    for f in "${files[@]}"; do
        [[ $f == tests/* ]] && continue
        from=$(part_of "$f")
        if [ -z "$from" ]; then
            echo "$f:1: this file lies in no part of $rules"
            bad=1
            continue
        fi
        while IFS= read -r hit; do
            lineno=${hit%%:*}
            text=${hit#*:}
            if [[ $text =~ \#[[:space:]]*include[[:space:]]*\"([^\"]+)\" ]]; then
                h=${BASH_REMATCH[1]}
                n=${h##*/}
                if [ -n "${generated[$n]:-}" ]; then
                    to=${generated[$n]}
                else
                    where=${header_at[$n]:-}
                    if [ -z "$where" ]; then
                        echo "$f:$lineno: #include \"$h\": no header of that name in the tree (and no 'generated' rule)"
                        bad=1
                        continue
                    fi
                    if [[ $where == *" "* ]]; then
                        echo "$f:$lineno: #include \"$h\": several headers have that name ($where); names must be unique"
                        bad=1
                        continue
                    fi
                    to=$(part_of "$where")
                fi
                if ! allowed "$from" "$to" "$n"; then
                    echo "$f:$lineno: #include \"$h\" reaches part $to, which part $from may not include ($rules)"
                    bad=1
                fi
            elif [[ $text =~ \#[[:space:]]*include[[:space:]]*\<([^\>]+)\> ]]; then
                h=${BASH_REMATCH[1]}
                for pat in "${sys_patterns[@]}"; do
                    # shellcheck disable=SC2053
                    [[ $h == $pat ]] || continue
                    ok=1
                    allowed_sys "$from" "${sys_allow[$pat]}" || ok=0
                    if [ $ok -eq 0 ]; then
                        echo "$f:$lineno: #include <$h>: only ${sys_allow[$pat]} may include it ($rules)"
                        bad=1
                    fi
                    break
                done
            fi
        done < <(grep -n -E '^[[:space:]]*#[[:space:]]*include' "$src/$f")
    done
    return $bad
}

# part_matches ENTRY PART: does a rule's ENTRY name PART ("x" exactly; "x/*": x or below)?
part_matches() {
    [ "$1" = "$2" ] && return 0
    [[ $1 == */\* ]] && { [ "$2" = "${1%/\*}" ] || [[ $2 == "${1%\*}"* ]]; }
}

# allowed_sys PART "PARTS...": is PART one of PARTS?
allowed_sys() {
    local a
    for a in $2; do
        part_matches "$a" "$1" && return 0
    done
    return 1
}

self_test() {
    local rules=$1 tmp fails=0 out
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    mk() { mkdir -p "$(dirname "$tmp/$1")"; printf '%s\n' "${@:2}" >"$tmp/$1"; }
    # a clean little tree: every kind of allowed include
    mk common/status.h '#pragma once'
    mk kernels/backend.h '#include "status.h"'
    mk engine/runtime/engine.h '#include "backend.h"' '#include "status.h"'
    mk transfer/kv_transfer.h '#include "engine.h"' '#include <ucp/api/ucp.h>'
    mk daemons/proto/speed_proto.h '#include "speed.pb-c.h"' '#include <protobuf-c/protobuf-c.h>'
    mk daemons/router/router.c '#include "speed_proto.h"' '#include <stdio.h>'
    mk tools/speedctl/speedctl.c '#include "kv_transfer.h"' '#include "engine.h"'
    mk tests/support/check.h '#pragma once'
    out=$(check "$tmp" "$rules")
    if [ $? -ne 0 ]; then echo "self-test: a clean tree was refused:"; echo "$out"; fails=1; fi

    # expect FILE LINE TEXT...: the tree with FILE broken must fail, naming FILE:LINE
    expect() {
        local file=$1 line=$2
        shift 2
        local saved
        saved=$(cat "$tmp/$file" 2>/dev/null || true)
        mk "$file" "$@"
        out=$(check "$tmp" "$rules")
        local rc=$?
        if [ $rc -ne 1 ] || [[ $out != *"$file:$line:"* ]]; then
            echo "self-test: breaking $file:$line was not caught (exit $rc): $out"
            fails=1
        fi
        if [ -n "$saved" ]; then printf '%s\n' "$saved" >"$tmp/$file"; else rm -f "$tmp/$file"; fi
    }
    expect kernels/cpu/k.c 2 '#include "backend.h"' '#include "engine.h"'          # kernels -> engine
    expect engine/runtime/e.c 1 '#include "kv_transfer.h"'                          # engine -> transfer
    expect engine/runtime/f.c 1 '#include "speed_proto.h"'                          # engine -> daemons
    expect daemons/router/r.c 3 '#include "speed_proto.h"' '' '#include "engine.h"' # router -> runtime
    expect daemons/router/u.c 1 '#include <ucp/api/ucp.h>'                          # router -> UCX
    expect daemons/router/c.c 1 '#include <cuda_runtime.h>'                         # router -> CUDA
    expect engine/runtime/g.c 1 '#include "check.h"'                                # source -> tests
    expect engine/runtime/h.c 1 '#include "missing.h"'                              # unknown header
    mk kernels/backend_kind.h '#include "status.h"'                                  # one header allowed by name
    mk daemons/cluster/c.c '#include "backend_kind.h"'
    out=$(check "$tmp" "$rules") || { echo "self-test: a header allowed by name was refused: $out"; fails=1; }
    expect daemons/cluster/d.c 1 '#include "backend.h"'                             # ... not its neighbours
    rm -f "$tmp/daemons/cluster/c.c"
    expect tools/other/x.c 1 '#include "status.h"'                                 # in no part
    mk engine/depth/status.h '#pragma once'                                          # a second status.h
    expect common/log.c 1 '#include "status.h"'
    rm -f "$tmp/engine/depth/status.h"
    [ $fails -eq 0 ] && echo "self-test: every break was caught"
    return $fails
}

if [ "${1:-}" = "--self-test" ]; then
    rules=${2:-$here/layers.txt}
    [ -f "$rules" ] || die "no rules file $rules"
    self_test "$rules"
    exit $?
fi

src=${1:-}
[ -n "$src" ] && [ -d "$src" ] || die "usage: check_layers.sh SOURCE_DIR [RULES] | --self-test [RULES]"
rules=${2:-$here/layers.txt}
[ -f "$rules" ] || die "no rules file $rules"
out=$(check "$src" "$rules")
rc=$?
if [ $rc -eq 0 ]; then
    echo "test_arch: every include keeps the layering in $rules"
else
    echo "$out"
    echo "test_arch: $(printf '%s\n' "$out" | grep -c ':[0-9]*: ') include(s) break the layering" >&2
fi
exit $rc
