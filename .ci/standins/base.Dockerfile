# Base of the stand-in images (.ci/compose_stage.sh): the Debian bookworm rootfs the stage made with
# debootstrap and imported as asyncthink-ci/rootfs:bookworm, plus the host's extra CA certificates (a TLS
# proxy in front of the package registries needs them inside the images too). Build context: a folder
# with a certs/ folder holding those certificates (*.crt), possibly none.
FROM asyncthink-ci/rootfs:bookworm
# an imported rootfs has no environment at all
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8
# no init system in a container: package scripts must not try to start services
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
COPY certs/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null
