/* placeholder: written by the GPU backend work */
