#!/usr/bin/env bash
# Every YAML file under deploy/ parses, and the manifests have the structure kube-apiserver, kubeadm and the
# kubelet need (see check_manifests.py). Needs /usr/bin/python3 with PyYAML (Debian: python3-yaml).
set -euo pipefail
source_dir=${1:?usage: yaml_manifests_test.sh SOURCE_DIR}
python=/usr/bin/python3
if [[ ! -x $python ]] || ! $python -c 'import yaml' 2>/dev/null; then
  echo "SKIP: $python with PyYAML is needed (apt-get install -y python3-yaml)"
  exit 77
fi
exec "$python" "$(dirname "$0")/check_manifests.py" "$source_dir"
