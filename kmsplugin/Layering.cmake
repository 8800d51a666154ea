# The dependency rule (README "Layout"), enforced per target at configure time.
#
# There is no global include directory: each of our libraries gets the repository root as its own include path,
# and may include another folder's header only if it links that folder's library (directly or through the
# libraries it links). So `crypto` includes nothing of ours, `core` only `crypto`, a key source never includes
# `server` or `cli`, and nothing but the `kmsplugin` executable links `cli`. A violation stops cmake with the file,
# the include and the fix (link the library, or move the code down).

# folder (under the repository root) -> the target that owns it; the longest matching prefix wins.
set(KMS_LAYER_FOLDERS
  "crypto=kms_crypto"
  "kmsplugin/core=kms_core"
  "kmsplugin/config=kms_config"
  "kmsplugin/keysource/common=kms_keysource_common"
  "kmsplugin/keysource/local=kms_keysource_local"
  "kmsplugin/keysource/pkcs11=kms_keysource_pkcs11"
  "kmsplugin/keysource/vault=kms_keysource_vault"
  "kmsplugin/keysource=kms_keysource_registry"
  "kmsplugin/observe=kms_observe"
  "kmsplugin/server=kms_server"
  "kmsplugin/daemon=kms_daemon"
  "kmsplugin/admin=kms_admin"
  "kmsplugin/audit=kms_audit"
  "kmsplugin/doctor=kms_doctor"
  "kmsplugin/cli=kms_cli")

# Libraries nobody but these may link (beyond the rule that includes follow links).
set(KMS_LAYER_ONLY_LINKED_BY_kms_cli "kmsplugin")

function(kms_layer_owner path out)
  set(best "")
  set(best_len 0)
  foreach(entry ${KMS_LAYER_FOLDERS})
    string(REPLACE "=" ";" pair "${entry}")
    list(GET pair 0 folder)
    list(GET pair 1 target)
    string(LENGTH "${folder}" len)
    string(SUBSTRING "${path}" 0 ${len} head)
    if(head STREQUAL folder AND len GREATER best_len)
      string(SUBSTRING "${path}" ${len} 1 next)
      if(next STREQUAL "/")
        set(best "${target}")
        set(best_len ${len})
      endif()
    endif()
  endforeach()
  set(${out} "${best}" PARENT_SCOPE)
endfunction()

# Every target `target` reaches through its link libraries (our targets only).
function(kms_layer_closure target out)
  set(seen "")
  set(queue "${target}")
  while(queue)
    list(POP_FRONT queue current)
    if(NOT TARGET ${current} OR current IN_LIST seen)
      continue()
    endif()
    list(APPEND seen ${current})
    get_target_property(links ${current} LINK_LIBRARIES)
    get_target_property(ilinks ${current} INTERFACE_LINK_LIBRARIES)
    foreach(l ${links} ${ilinks})
      if(l MATCHES "^kms_" AND NOT l IN_LIST seen)
        list(APPEND queue ${l})
      endif()
    endforeach()
  endwhile()
  set(${out} "${seen}" PARENT_SCOPE)
endfunction()

function(kms_check_layering)
  set(errors "")
  foreach(entry ${KMS_LAYER_FOLDERS})
    string(REPLACE "=" ";" pair "${entry}")
    list(GET pair 0 folder)
    list(GET pair 1 target)
    if(NOT TARGET ${target})
      message(FATAL_ERROR "layering: ${folder} has no target ${target}; fix: update KMS_LAYER_FOLDERS")
    endif()
    target_include_directories(${target} PUBLIC ${CMAKE_SOURCE_DIR})
    kms_layer_closure(${target} closure)
    # The folder's own sources and headers (not those of a deeper folder that another target owns).
    file(GLOB files "${CMAKE_SOURCE_DIR}/${folder}/*.cc" "${CMAKE_SOURCE_DIR}/${folder}/*.h")
    foreach(file ${files})
      file(RELATIVE_PATH rel "${CMAKE_SOURCE_DIR}" "${file}")
      file(STRINGS "${file}" includes REGEX "^#include \"(kmsplugin|crypto)/")
      foreach(line ${includes})
        string(REGEX REPLACE "^#include \"([^\"]+)\".*" "\\1" header "${line}")
        kms_layer_owner("${header}" owner)
        if(owner STREQUAL "")
          list(APPEND errors "${rel}: includes ${header}, which no library owns (fix: add its folder to KMS_LAYER_FOLDERS)")
        elseif(NOT owner IN_LIST closure)
          list(APPEND errors "${rel}: includes ${header} (${owner}) but ${target} does not link ${owner} (fix: link it, or move the code into a folder both may depend on)")
        endif()
      endforeach()
    endforeach()
  endforeach()
  # Restricted libraries.
  foreach(entry ${KMS_LAYER_FOLDERS})
    string(REPLACE "=" ";" pair "${entry}")
    list(GET pair 1 target)
    get_target_property(links ${target} LINK_LIBRARIES)
    foreach(l ${links})
      if(DEFINED KMS_LAYER_ONLY_LINKED_BY_${l})
        list(APPEND errors "${target} links ${l}, which only ${KMS_LAYER_ONLY_LINKED_BY_${l}} may link")
      endif()
    endforeach()
  endforeach()
  if(errors)
    list(JOIN errors "\n  " text)
    message(FATAL_ERROR "layering rule broken (kmsplugin/Layering.cmake):\n  ${text}")
  endif()
endfunction()
